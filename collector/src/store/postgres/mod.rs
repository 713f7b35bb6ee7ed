//! PostgreSQL store, for several collector replicas sharing one database.
//!
//! Behaves exactly like [`super::sqlite`] (the reference): the same tables, the same
//! idempotency on `(node, epoch, seq)`, the same "latest observed wins" node facts.
//!
//! Connections: one writer connection behind a tokio mutex, so this replica's transactions
//! run one at a time like SQLite's single writer, and up to [`READERS`] reader connections,
//! opened as reads overlap: a read takes the one with the fewest queries in flight
//! (tokio-postgres pipelines the queries sharing one, but its server process runs them one
//! after another). Replicas are serialised by the
//! database itself: `INSERT ... ON CONFLICT DO NOTHING` on the report key makes a second
//! replica wait for the first one's commit and then see a duplicate. A transaction that loses
//! a deadlock or serialisation race is retried. When a connection's task has ended (the
//! server went away), the call that notices fails with [`StoreError::Postgres`] and the next
//! call reconnects.
//!
//! The schema is versioned in `sov_schema_version`; migrations run in one transaction under
//! `pg_advisory_xact_lock`, so replicas starting together migrate once. Tables live in the
//! connection's `search_path` (set it in the URL with `?options=-csearch_path%3Dname`, or use
//! [`PostgresStore::connect_with_schema`]). Connections are plain TCP or Unix sockets
//! (`NoTls`): run the database on the same host or network segment, or behind a TLS proxy.
//!
//! This file holds the connections, the schema migrations (`collector/migrations/postgres/`,
//! one `.sql` file per version, the same versions as SQLite's) and the
//! [`Store`](super::Store) impl; each concern has its own file: `ingest.rs`, `queries.rs`,
//! `breaches.rs` (breaches and the two hash-chained logs), `outbox.rs`, `tokens.rs`,
//! `retention.rs`. Rows are read through [`super::rows`], shared with SQLite.

use std::sync::Arc;
use std::time::Duration;

use sov_evidence::audit::{AuditEntry, AuditRecord};
use sov_evidence::chain::{LogRecord, canonical_json};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::FromSql;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

use super::rows;
use super::{
    BreachChange, BreachFilter, Derivation, DeriveStatus, EgressQuery, GpuSummary, GpuUsageRow,
    IncomingReport, IngestOutcome, NewEnrollToken, NodePeer, NodeRow, OutboxItem, OutboxRow,
    PruneStats, Retention, Settle, SinkStats, StoreError, TokenRecord, TokenSpend, Underived,
    format_name, to_i64,
};
use crate::breach::{Breach, BreachState, EVENT_OPEN, EVENT_RESOLVED, EVENT_UPDATED, Observation};

mod breaches;
mod containers;
mod ingest;
mod outbox;
mod partitions;
mod queries;
mod retention;
mod tokens;
mod training;

use ingest::Statements;

/// Connect timeout used when the URL does not set `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Key of the advisory lock held while migrating ("sov_migr").
const MIGRATION_LOCK_KEY: i64 = 0x736f_765f_6d69_6772;

/// Attempts of one ingest transaction that loses a deadlock or serialisation race.
const INGEST_ATTEMPTS: u32 = 3;

/// Schema version this code writes: the number of migrations.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Migration `i` takes a database from version `i` to `i + 1`; versions mean the same tables
/// as SQLite's `user_version`. Append only; never edit one that has shipped.
const MIGRATIONS: [&str; 26] = [
    include_str!("../../../migrations/postgres/0001_reports.sql"),
    include_str!("../../../migrations/postgres/0002_host_and_gpu_samples.sql"),
    include_str!("../../../migrations/postgres/0003_weight_files.sql"),
    include_str!("../../../migrations/postgres/0004_flows.sql"),
    include_str!("../../../migrations/postgres/0005_breaches_and_breach_log.sql"),
    include_str!("../../../migrations/postgres/0006_alert_outbox_leases_and_peers.sql"),
    include_str!("../../../migrations/postgres/0007_audit_log_and_api_tokens.sql"),
    include_str!("../../../migrations/postgres/0008_enroll_tokens.sql"),
    include_str!("../../../migrations/postgres/0009_minute_aggregates.sql"),
    include_str!("../../../migrations/postgres/0010_verdict_answers_and_measurement.sql"),
    include_str!("../../../migrations/postgres/0011_containers.sql"),
    include_str!("../../../migrations/postgres/0012_enroll_token_replaces.sql"),
    include_str!("../../../migrations/postgres/0013_training_runs.sql"),
    include_str!("../../../migrations/postgres/0014_derive_queue.sql"),
    include_str!(
        "../../../migrations/postgres/0015_chain_checkpoints_and_inventory_generations.sql"
    ),
    include_str!("../../../migrations/postgres/0016_hourly_rollups.sql"),
    include_str!("../../../migrations/postgres/0017_foreign_flows_per_report.sql"),
    include_str!("../../../migrations/postgres/0018_daily_rollups.sql"),
    include_str!("../../../migrations/postgres/0019_derive_partitions.sql"),
    include_str!("../../../migrations/postgres/0020_fleet_rollups.sql"),
    include_str!("../../../migrations/postgres/0021_rest_of_day_rows.sql"),
    include_str!("../../../migrations/postgres/0022_contested_covering_index.sql"),
    include_str!("../../../migrations/postgres/0023_late_flow_rows_without_triggers.sql"),
    include_str!("../../../migrations/postgres/0024_contested_rollups.sql"),
    include_str!("../../../migrations/postgres/0025_contested_late_rows_without_triggers.sql"),
    include_str!("../../../migrations/postgres/0026_report_bodies_lz4.sql"),
];

/// PostgreSQL-backed [`Store`]. Cheap to clone: clones share the connections
/// ([`PostgresStore::another_deriver`]: a handle with a deriver connection of its own).
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
    /// The deriver's own connection, so a derive transaction never holds up acknowledgements;
    /// each deriver of this collector has one (and with it its share of the partitions).
    deriver: Arc<Mutex<Option<Writer>>>,
}

struct Inner {
    config: Config,
    schema: Option<String>,
    writer: Mutex<Option<Writer>>,
    /// [`READERS`] slots, each connected when first needed.
    readers: Vec<Mutex<Option<Arc<Client>>>>,
    /// Reports waiting for the writer (group commit).
    pending: std::sync::Mutex<super::Pending>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Config's Debug leaves the password out.
        f.debug_struct("PostgresStore")
            .field("config", &self.inner.config)
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

/// The writer connection and its prepared ingest statements.
struct Writer {
    client: Client,
    st: Statements,
    /// The derive partitions this connection holds (the deriver's connection only).
    parts: partitions::Partitions,
}

fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Postgres { context, source }
}

fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize, context: &'static str) -> Result<T, StoreError> {
    row.try_get(i).map_err(pg(context))
}

/// A counter read back; never negative in a database this code wrote: clamp rather than fail.
fn get_u64(row: &Row, i: usize, context: &'static str) -> Result<u64, StoreError> {
    Ok(u64::try_from(get::<i64>(row, i, context)?).unwrap_or(0))
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `url` with any password replaced by `***`, for messages and logs.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                url.to_owned()
            }
        }
        None => url.to_owned(),
    }
}

/// Whether a transaction failed only because it lost a race with another one.
fn retryable(err: &StoreError) -> bool {
    matches!(err, StoreError::Postgres { source, .. }
    if source.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    }))
}

/// Reader connections at most (see the module's notes; as SQLite's
/// [`super::sqlite::READERS`]): with one, a regulator's question of several seconds at
/// 10,000 nodes held up every token lookup, rule evaluation and other question behind it.
pub const READERS: usize = 4;

/// The session settings of the reader connection (what the questions run on).
pub const READER_SESSION: &str = "SET jit = off; SET work_mem = '64MB';";

/// Open one connection, run its driver task, and set its session (schema, read only).
async fn open_connection(
    config: &Config,
    schema: Option<&str>,
    read_only: bool,
) -> Result<Client, StoreError> {
    let (client, connection) = config.connect(NoTls).await.map_err(pg("connect"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(error = %error, "postgres connection ended");
        }
    });
    let mut session = String::new();
    if let Some(schema) = schema {
        session.push_str(&format!("SET search_path TO {};", quote_ident(schema)));
    }
    if read_only {
        // The regulators' questions over a fleet read hundreds of thousands of rows in one
        // statement, whose cost estimate passes PostgreSQL's JIT thresholds: compiling it
        // took 1.2 s of a 2.3 s `egress --by process` at 1,000 nodes (docs/PERFORMANCE.md
        // §8i), far more than it saved. And their groups (180,000 for `--by process` over a
        // week of 1,000 nodes) fit a hash table in 64 MB, where the default 4 MB sorted them
        // on disk. At most [`READERS`] readers, so this bounds their memory too.
        session.push_str(READER_SESSION);
        session.push_str("SET default_transaction_read_only = on;");
    }
    if !session.is_empty() {
        client
            .batch_execute(&session)
            .await
            .map_err(pg("set session"))?;
    }
    Ok(client)
}

/// Bring the schema up to date: one transaction under an advisory lock, so that replicas
/// starting together migrate once and the others find the work done.
async fn migrate(client: &mut Client, schema: Option<&str>) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg("begin migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(pg("lock for migration"))?;
    if let Some(schema) = schema {
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        ))
        .await
        .map_err(pg("create schema"))?;
    }
    tx.batch_execute("CREATE TABLE IF NOT EXISTS sov_schema_version (version BIGINT NOT NULL)")
        .await
        .map_err(pg("create schema version table"))?;
    let found: Option<i64> = tx
        .query_one("SELECT MAX(version) FROM sov_schema_version", &[])
        .await
        .map_err(pg("read schema version"))?
        .try_get(0)
        .map_err(pg("read schema version"))?;
    let found = found.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        // Nothing to do; the transaction only held the lock.
        return tx.commit().await.map_err(pg("commit migration"));
    }
    for step in MIGRATIONS.iter().skip(usize::try_from(found).unwrap_or(0)) {
        tx.batch_execute(step).await.map_err(pg("migrate schema"))?;
    }
    tx.execute("DELETE FROM sov_schema_version", &[])
        .await
        .map_err(pg("write schema version"))?;
    tx.execute(
        "INSERT INTO sov_schema_version (version) VALUES ($1)",
        &[&SCHEMA_VERSION],
    )
    .await
    .map_err(pg("write schema version"))?;
    tx.commit().await.map_err(pg("commit migration"))?;
    tracing::info!(
        from = found,
        version = SCHEMA_VERSION,
        "database schema migrated"
    );
    Ok(())
}

type Tx<'a> = tokio_postgres::Transaction<'a>;

impl PostgresStore {
    /// Connect to `url` (`postgres://user@host:port/db?options=...`), migrate the schema in
    /// the connection's default `search_path`, and open the writer and reader connections.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_inner(url, None).await
    }

    /// Like [`PostgresStore::connect`], with every table in `schema` (created if needed;
    /// its `search_path` replaces any the URL sets). Tests use one schema each.
    pub async fn connect_with_schema(url: &str, schema: &str) -> Result<Self, StoreError> {
        Self::connect_inner(url, Some(schema.to_owned())).await
    }

    /// Every lease and its holder, `(name, holder)` sorted by name (for operators and tests:
    /// which replica evaluates the rules and delivers to each sink).
    pub async fn lease_holders(&self) -> Result<Vec<(String, String)>, StoreError> {
        let client = self.reader().await?;
        let rows = client
            .query(
                "SELECT name, holder FROM leases ORDER BY name COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(pg("read leases"))?;
        rows.iter()
            .map(|r| Ok((get(r, 0, "read lease")?, get(r, 1, "read lease")?)))
            .collect()
    }

    /// How many derive partitions this store's deriver holds now (see `partitions.rs`),
    /// balancing first when due; for operators, tests and benchmarks.
    pub async fn derive_partitions_held(&self) -> Result<usize, StoreError> {
        let mut w = self.deriver().await?;
        let Writer { client, parts, .. } = &mut *w;
        partitions::balance(client, parts, false).await?;
        Ok(parts.held.len())
    }

    /// Drop the schema given to [`PostgresStore::connect_with_schema`] with everything in it
    /// (tests clean up with it). Does nothing for a store on the default schema.
    #[cfg(any(test, feature = "testutil"))]
    pub async fn drop_schema(&self) -> Result<(), StoreError> {
        let Some(schema) = self.inner.schema.clone() else {
            return Ok(());
        };
        let w = self.writer().await?;
        w.client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(&schema)
            ))
            .await
            .map_err(pg("drop schema"))
    }

    async fn connect_inner(url: &str, schema: Option<String>) -> Result<Self, StoreError> {
        let mut config: Config = url.parse().map_err(pg("parse postgres url"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("sov-collector");
        }
        let mut client = open_connection(&config, schema.as_deref(), false).await?;
        migrate(&mut client, schema.as_deref()).await?;
        let st = Statements::prepare(&client).await?;
        let reader = open_connection(&config, schema.as_deref(), true).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                schema,
                writer: Mutex::new(Some(Writer {
                    client,
                    st,
                    parts: Default::default(),
                })),
                readers: std::iter::once(Some(Arc::new(reader)))
                    .chain(std::iter::repeat_with(|| None))
                    .take(READERS)
                    .map(Mutex::new)
                    .collect(),
                pending: Default::default(),
            }),
            deriver: Arc::default(),
        })
    }

    /// The writer connection, reconnected first if its connection task has ended. The guard
    /// serialises this replica's write transactions.
    async fn writer(&self) -> Result<MappedMutexGuard<'_, Writer>, StoreError> {
        Self::connection(&self.inner.writer, &self.inner, "writer").await
    }

    /// A handle on the same store with a deriver connection of its own (opened on first
    /// use): a second deriver in this collector, taking its own share of the node partitions
    /// as a replica's deriver would (`partitions.rs`), so that derivation uses more than one
    /// of PostgreSQL's cores (`[derive] connections`).
    pub fn another_deriver(&self) -> PostgresStore {
        PostgresStore {
            inner: self.inner.clone(),
            deriver: Arc::default(),
        }
    }

    /// The deriver's connection (opened on first use), like [`PostgresStore::writer`].
    async fn deriver(&self) -> Result<MappedMutexGuard<'_, Writer>, StoreError> {
        Self::connection(&self.deriver, &self.inner, "deriver").await
    }

    async fn connection<'a>(
        slot: &'a Mutex<Option<Writer>>,
        inner: &Inner,
        role: &'static str,
    ) -> Result<MappedMutexGuard<'a, Writer>, StoreError> {
        let mut guard = slot.lock().await;
        if guard.as_ref().is_none_or(|w| w.client.is_closed()) {
            if guard.take().is_some() {
                tracing::warn!(role, "postgres connection lost; reconnecting");
            }
            let client = open_connection(&inner.config, inner.schema.as_deref(), false).await?;
            let st = Statements::prepare(&client).await?;
            *guard = Some(Writer {
                client,
                st,
                parts: Default::default(),
            });
        }
        MutexGuard::try_map(guard, Option::as_mut)
            .map_err(|_| StoreError::Task(format!("postgres {role} connection missing")))
    }

    /// A reader connection: the first idle one, else the one with the fewest queries in
    /// flight (each holds a clone of its `Arc`); connected first if it never was, or if its
    /// connection task has ended.
    async fn reader(&self) -> Result<Arc<Client>, StoreError> {
        let mut least: Option<(usize, usize)> = None;
        for (i, slot) in self.inner.readers.iter().enumerate() {
            let busy = match slot.lock().await.as_ref() {
                Some(c) if !c.is_closed() => Arc::strong_count(c) - 1,
                _ => 0,
            };
            if least.is_none_or(|(fewest, _)| busy < fewest) {
                least = Some((busy, i));
            }
            if busy == 0 {
                break;
            }
        }
        let slot = least.map_or(0, |(_, i)| i);
        let Some(slot) = self.inner.readers.get(slot) else {
            return Err(StoreError::Task("no reader connection slot".to_owned()));
        };
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        if guard.take().is_some() {
            tracing::warn!("postgres reader connection lost; reconnecting");
        }
        let c = Arc::new(
            open_connection(&self.inner.config, self.inner.schema.as_deref(), true).await?,
        );
        *guard = Some(c.clone());
        Ok(c)
    }
}

crate::store::store_by_concern!(PostgresStore);

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::panic::AssertUnwindSafe;
    use std::sync::atomic::{AtomicU32, Ordering};

    use futures::FutureExt;

    use super::retention::RETENTION_LOCK_KEY;
    use super::*;
    use crate::store::Store;
    use crate::store::suite::{Backend, Fixture, report, store_suite};

    /// Where the test database is.
    const URL_VAR: &str = "SOV_TEST_POSTGRES_URL";
    /// Set to 1 (CI does) to fail rather than skip when the database cannot be reached.
    const REQUIRE_VAR: &str = "SOV_REQUIRE_POSTGRES";
    const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

    fn test_url() -> String {
        std::env::var(URL_VAR)
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_TEST_URL.to_owned())
    }

    /// A schema name no other test (or concurrent test run) uses.
    fn fresh_schema() -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        format!(
            "sov_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    async fn try_connect(url: &str) -> Result<Client, tokio_postgres::Error> {
        let mut config: Config = url.parse()?;
        config.connect_timeout(Duration::from_secs(5));
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// The test database's URL and an admin connection to it; `None`, after a loud SKIP
    /// line, when it cannot be reached (a panic instead when it is required).
    async fn admin() -> Option<(String, Client)> {
        let url = test_url();
        match try_connect(&url).await {
            Ok(client) => Some((url, client)),
            Err(err) => {
                let shown = redact_url(&url);
                let cause = std::error::Error::source(&err)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                if std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1") {
                    panic!(
                        "{REQUIRE_VAR}=1 but PostgreSQL is not reachable at {shown} ({err}{cause})"
                    );
                }
                let test = std::thread::current()
                    .name()
                    .unwrap_or("a postgres test")
                    .to_owned();
                // One write, straight to stderr, so that the harness's capture does not hide
                // it and parallel tests do not cut it up.
                let line = format!(
                    "SKIP: PostgreSQL not reachable at {shown} ({err}{cause}): {test} did not \
                     run (set {URL_VAR}; {REQUIRE_VAR}=1 makes this a failure)\n"
                );
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
                None
            }
        }
    }

    /// Under a load that never lets the queue empty, the drainer gives the writer back between
    /// batches: a lease (the rules', the alerts') waits for one batch, not for the whole queue.
    #[tokio::test]
    async fn a_lease_waits_for_one_batch_of_the_drainer_not_for_the_whole_queue() {
        with_schema(|url, schema| async move {
            let store = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            // Three batches' worth queued, the writer held meanwhile by the test.
            let writer = store.writer().await.unwrap();
            let n = 3 * crate::store::MAX_BATCH_REPORTS as u64;
            let mut answers: Vec<_> = {
                let mut p = store.pending();
                (1..=n).map(|seq| p.push(report("q", 1, seq)).0).collect()
            };
            // The drainer waits for the writer first, the lease second (the lock is fair).
            let drainer = tokio::spawn({
                let store = store.clone();
                async move { store.drain().await }
            });
            tokio::task::yield_now().await;
            let lease = tokio::spawn({
                let store = store.clone();
                async move { store.take_lease("rules", "me", 1_000, 10_000).await }
            });
            tokio::task::yield_now().await;
            drop(writer);
            assert!(lease.await.unwrap().unwrap());
            let answered = answers
                .iter_mut()
                .map(|a| a.try_recv().is_ok())
                .filter(|ok| *ok)
                .count();
            assert!(
                answered < answers.len(),
                "the lease waited for the whole queue ({answered} of {} answered)",
                answers.len()
            );
            drainer.await.unwrap();
            assert_eq!(store.list_nodes("", 10).await.unwrap().len(), 1);
        })
        .await;
    }

    async fn drop_schema(admin: &Client, schema: &str) {
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(schema)
            ))
            .await
            .unwrap();
    }

    /// Run `body` with the test database and a fresh schema name, then drop that schema
    /// (also when `body` panics).
    async fn with_schema<F>(body: impl FnOnce(String, String) -> F)
    where
        F: std::future::Future<Output = ()>,
    {
        let Some((url, admin)) = admin().await else {
            return;
        };
        let schema = fresh_schema();
        let outcome = AssertUnwindSafe(body(url, schema.clone()))
            .catch_unwind()
            .await;
        drop_schema(&admin, &schema).await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    /// A fresh store in its own schema.
    struct PgFixture {
        admin: Client,
        schema: String,
        store: PostgresStore,
    }

    #[async_trait::async_trait(?Send)]
    impl Backend for PgFixture {
        fn store(&self) -> &dyn Store {
            &self.store
        }

        async fn count(&self, sql: &str) -> i64 {
            self.admin.query_one(sql, &[]).await.unwrap().get(0)
        }
    }

    #[async_trait::async_trait(?Send)]
    impl Fixture for PgFixture {
        async fn create() -> Option<Self> {
            let (url, admin) = admin().await?;
            let schema = fresh_schema();
            let store = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            admin
                .batch_execute(&format!("SET search_path TO {}", quote_ident(&schema)))
                .await
                .unwrap();
            Some(Self {
                admin,
                schema,
                store,
            })
        }

        async fn destroy(self) {
            drop(self.store);
            drop_schema(&self.admin, &self.schema).await;
        }
    }

    store_suite!(PgFixture);

    async fn count(url: &str, schema: &str, sql: &str) -> i64 {
        let c = try_connect(url).await.unwrap();
        c.batch_execute(&format!("SET search_path TO {}", quote_ident(schema)))
            .await
            .unwrap();
        c.query_one(sql, &[]).await.unwrap().get(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_replicas_ingesting_the_same_report_store_it_once() {
        with_schema(|url, schema| async move {
            let (a, b) = tokio::join!(
                PostgresStore::connect_with_schema(&url, &schema),
                PostgresStore::connect_with_schema(&url, &schema)
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            for seq in 1..=20 {
                let (x, y) =
                    tokio::join!(a.ingest(report("n", 1, seq)), b.ingest(report("n", 1, seq)));
                let mut outcomes = [x.unwrap(), y.unwrap()];
                outcomes.sort_by_key(|o| *o != IngestOutcome::Stored);
                assert_eq!(
                    outcomes,
                    [IngestOutcome::Stored, IngestOutcome::Duplicate],
                    "seq {seq}"
                );
            }
            let n = &b.list_nodes("", 10).await.unwrap()[0];
            assert_eq!(
                (n.reports, n.last_seq, n.missing, n.conflicts),
                (20, 20, 0, 0)
            );
            assert_eq!(
                count(&url, &schema, "SELECT COUNT(*) FROM reports").await,
                20
            );
        })
        .await;
    }

    /// One append batch (one statement per table) leaves what one report at a time, in key
    /// order, leaves: a node's facts from its latest observation (a later key observed
    /// earlier does not win; of two observed at one instant the later key does), its first
    /// and latest reception, each epoch's counters, gaps, the derive queue in key order, a
    /// key twice stored once and the second copy a duplicate, a reused key a conflict.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_append_batch_leaves_what_report_by_report_appends_leave() {
        with_schema(|url, schema| async move {
            let store = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            // Stored first, alone: the batch meets a stored node, epoch and key.
            assert_eq!(
                store.ingest(report("b", 1, 1)).await.unwrap(),
                IngestOutcome::Stored
            );
            let mut batch = Vec::new();
            for (node, epoch, seq, observed, received, version) in [
                ("b", 1, 3, 5_000, 10_200, "b-1-3"),
                ("a", 2, 1, 3_000, 10_100, "a-2-1"),
                ("a", 1, 7, 4_000, 10_050, "a-1-7"),
                ("a", 1, 5, 4_000, 10_300, "a-1-5"),
                ("a", 1, 6, 2_000, 10_400, "a-1-6"),
                ("b", 1, 2, 9_000, 10_000, "b-1-2"),
                ("b", 1, 2, 9_000, 10_000, "b-1-2"),
                ("b", 1, 1, 1, 10_500, "b-1-1 reused"),
            ] {
                let mut r = report(node, epoch, seq);
                r.observed_unix_ms = observed;
                r.received_unix_ms = received;
                r.agent_version = version.to_owned();
                if seq == 7 {
                    r.gaps = vec![crate::store::GapRecord {
                        first_seq: 2,
                        last_seq: 4,
                        reason: "spool full".to_owned(),
                        dropped_unix_ms: 3_500,
                    }];
                }
                batch.push(r);
            }
            let outcomes = {
                let mut w = store.writer().await.unwrap();
                let refs: Vec<&crate::store::IncomingReport> = batch.iter().collect();
                ingest::ingest_batch_once(&mut w, &refs).await.unwrap()
            };
            use IngestOutcome::{Conflict, Duplicate, Stored};
            assert_eq!(
                outcomes,
                [
                    Stored, Stored, Stored, Stored, Stored, Stored, Duplicate, Conflict
                ]
            );
            let c = try_connect(&url).await.unwrap();
            c.batch_execute(&format!("SET search_path TO {}", quote_ident(&schema)))
                .await
                .unwrap();
            let nodes: Vec<(String, String, i64, i64, i64, i64)> = c
                .query(
                    "SELECT node, agent_version, first_seen_ms, last_seen_ms, last_observed_ms,
                            latest_epoch FROM nodes ORDER BY node",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
                .collect();
            // b's first report came alone before the batch (received at 1,005).
            let b_first = 1_005;
            assert_eq!(
                nodes,
                [
                    // a-1-5 and a-1-7 share the latest observation: the later key wins.
                    ("a".to_owned(), "a-1-7".to_owned(), 10_300, 10_400, 4_000, 2),
                    (
                        "b".to_owned(),
                        "b-1-2".to_owned(),
                        b_first,
                        10_200,
                        9_000,
                        1
                    ),
                ]
            );
            let epochs: Vec<(String, i64, i64, i64, i64, i64, i64)> = c
                .query(
                    "SELECT node, epoch, reports, last_seq, conflicts, first_seen_ms, last_seen_ms
                     FROM node_epochs ORDER BY node, epoch",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        r.get(1),
                        r.get(2),
                        r.get(3),
                        r.get(4),
                        r.get(5),
                        r.get(6),
                    )
                })
                .collect();
            assert_eq!(
                epochs,
                [
                    ("a".to_owned(), 1, 3, 7, 0, 10_300, 10_400),
                    ("a".to_owned(), 2, 1, 1, 0, 10_100, 10_100),
                    ("b".to_owned(), 1, 3, 3, 1, b_first, 10_200),
                ]
            );
            let queue: Vec<(String, i64, i64)> = c
                .query("SELECT node, epoch, seq FROM derive_queue ORDER BY id", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            let key = |n: &str, e: i64, s: i64| (n.to_owned(), e, s);
            assert_eq!(
                queue,
                [
                    key("b", 1, 1),
                    key("a", 1, 5),
                    key("a", 1, 6),
                    key("a", 1, 7),
                    key("a", 2, 1),
                    key("b", 1, 2),
                    key("b", 1, 3),
                ]
            );
            let gaps: Vec<(String, i64, i64, i64)> = c
                .query("SELECT node, epoch, first_seq, last_seq FROM gaps", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect();
            assert_eq!(gaps, [("a".to_owned(), 1, 2, 4)]);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_replica_skips_pruning_while_another_one_prunes() {
        with_schema(|url, schema| async move {
            let store = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            for seq in 1..=3 {
                store
                    .ingest(super::super::suite::report("p", 1, seq))
                    .await
                    .unwrap();
            }
            // Another replica holds the retention lock of this schema.
            let other = try_connect(&url).await.unwrap();
            other
                .execute(
                    "SELECT pg_advisory_lock($1::INT4, hashtext($2))",
                    &[&RETENTION_LOCK_KEY, &schema],
                )
                .await
                .unwrap();
            let skipped = store.prune(Retention::all_before(i64::MAX)).await.unwrap();
            assert_eq!(
                skipped,
                PruneStats {
                    skipped: true,
                    ..Default::default()
                }
            );
            assert_eq!(
                count(
                    &url,
                    &schema,
                    "SELECT COUNT(*) FROM reports WHERE octet_length(body) > 0"
                )
                .await,
                3
            );
            other
                .execute(
                    "SELECT pg_advisory_unlock($1::INT4, hashtext($2))",
                    &[&RETENTION_LOCK_KEY, &schema],
                )
                .await
                .unwrap();
            let ran = store.prune(Retention::all_before(i64::MAX)).await.unwrap();
            assert!(!ran.skipped);
            assert_eq!(ran.report_bodies, 3);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_replicas_spending_one_enrollment_token_at_once_spend_it_once() {
        with_schema(|url, schema| async move {
            let (a, b) = tokio::join!(
                PostgresStore::connect_with_schema(&url, &schema),
                PostgresStore::connect_with_schema(&url, &schema)
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            let tokens: Vec<NewEnrollToken> = (0..20)
                .map(|i| NewEnrollToken {
                    hash: format!("t{i}"),
                    created_unix_ms: 0,
                    expires_unix_ms: 1_000_000,
                    replaces: None,
                })
                .collect();
            a.add_enroll_tokens(&tokens).await.unwrap();
            for t in &tokens {
                let (x, y) = tokio::join!(
                    a.spend_enroll_token(&t.hash, "node-a", 10),
                    b.spend_enroll_token(&t.hash, "node-b", 10)
                );
                let spent = [x.unwrap(), y.unwrap()]
                    .iter()
                    .filter(|s| **s == TokenSpend::Spent)
                    .count();
                assert_eq!(spent, 1, "token {}", t.hash);
            }
        })
        .await;
    }

    /// Report `seq` of node `n` with one outbound flow of `bytes_sent` to 8.8.8.8:443 (US)
    /// ending at `end_unix_ms`.
    fn report_with_flow(seq: u64, end_unix_ms: i64, bytes_sent: u64) -> IncomingReport {
        let mut r = report("n", 1, seq);
        r.telemetry = crate::store::suite::telemetry();
        r.telemetry.flows = vec![crate::store::FlowRecord {
            flow: sov_proto::pb::Flow {
                remote_address: "8.8.8.8".into(),
                remote_port: 443,
                bytes_sent,
                direction: sov_proto::pb::Direction::Outbound as i32,
                end_unix_ms,
                ..Default::default()
            },
            country: "US".into(),
            ..Default::default()
        }];
        r
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_ingesting_and_deriving_one_nodes_reports_keep_exact_counters_and_derive_each_once()
     {
        with_schema(|url, schema| async move {
            let a = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            let b = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            let with_flow = |seq: u64| report_with_flow(seq, 90_000, 10);
            let (x, y) = tokio::join!(
                async {
                    for seq in (1..=40).step_by(2) {
                        assert_eq!(
                            a.ingest(with_flow(seq)).await.unwrap(),
                            IngestOutcome::Stored
                        );
                    }
                },
                async {
                    for seq in (2..=40).step_by(2) {
                        assert_eq!(
                            b.ingest(with_flow(seq)).await.unwrap(),
                            IngestOutcome::Stored
                        );
                    }
                }
            );
            let ((), ()) = (x, y);
            let n = &a.list_nodes("", 10).await.unwrap()[0];
            assert_eq!((n.reports, n.last_seq, n.missing), (40, 40, 0));
            // Both replicas derive the whole queue at once: each report is derived by one.
            let queued = a.underived(1000).await.unwrap();
            assert_eq!(queued.len(), 40);
            let batch: Vec<crate::store::Derivation> = queued
                .iter()
                .map(|u| crate::store::Derivation {
                    queue_id: u.queue_id,
                    report: with_flow(u.seq),
                })
                .collect();
            let (da, db) = tokio::join!(a.derive(batch.clone()), b.derive(batch));
            assert_eq!(da.unwrap() + db.unwrap(), 40);
            let (rows, _) = a
                .egress(EgressQuery {
                    since_unix_ms: 0,
                    until_unix_ms: 600_000,
                    by: "country".into(),
                    limit: 10,
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!((rows[0].bytes_sent, rows[0].connections), (400, 0));
        })
        .await;
    }

    /// `[derive] connections`: a second deriver in one collector (a handle with its own
    /// deriver connection) takes its own share of the node partitions, as a replica would; the
    /// two read disjoint nodes' reports, and together derive every report once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_second_deriver_in_one_collector_takes_its_own_share_and_each_report_is_derived_once()
    {
        with_schema(|url, schema| async move {
            let a = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            let b = a.another_deriver();
            let of = |node: usize, seq: u64| {
                let mut r = report_with_flow(seq, 90_000, 10);
                r.node = format!("node-{node}");
                r
            };
            for node in 0..32 {
                for seq in 1..=3 {
                    assert_eq!(
                        a.ingest(of(node, seq)).await.unwrap(),
                        IngestOutcome::Stored
                    );
                }
            }
            // Each reads (and so balances) until they hold every partition between them, both
            // some: the system's own signal, bounded in time.
            let t = std::time::Instant::now();
            loop {
                a.underived(1).await.unwrap();
                b.underived(1).await.unwrap();
                let (ha, hb) = (
                    a.derive_partitions_held().await.unwrap(),
                    b.derive_partitions_held().await.unwrap(),
                );
                if ha + hb == 64 && ha > 0 && hb > 0 {
                    break;
                }
                assert!(
                    t.elapsed() < std::time::Duration::from_secs(30),
                    "the two derivers did not share the partitions: {ha} + {hb}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let (qa, qb) = (
                a.underived(1000).await.unwrap(),
                b.underived(1000).await.unwrap(),
            );
            assert!(
                !qa.is_empty() && !qb.is_empty(),
                "{} and {}",
                qa.len(),
                qb.len()
            );
            assert_eq!(
                qa.len() + qb.len(),
                96,
                "every queued report read by one of them"
            );
            let nodes = |q: &[crate::store::Underived]| {
                q.iter()
                    .map(|u| u.node.clone())
                    .collect::<std::collections::BTreeSet<_>>()
            };
            assert!(
                nodes(&qa).is_disjoint(&nodes(&qb)),
                "a node's reports are one deriver's"
            );
            let batch = |q: &[crate::store::Underived]| -> Vec<crate::store::Derivation> {
                q.iter()
                    .map(|u| {
                        let node = u.node.trim_start_matches("node-").parse().unwrap();
                        crate::store::Derivation {
                            queue_id: u.queue_id,
                            report: of(node, u.seq),
                        }
                    })
                    .collect()
            };
            let (ba, bb) = (batch(&qa), batch(&qb));
            // At once, on their two connections; then each other's batch again: nothing twice.
            let (da, db) = tokio::join!(a.derive(ba.clone()), b.derive(bb.clone()));
            assert_eq!(da.unwrap() + db.unwrap(), 96);
            assert_eq!(a.derive(bb).await.unwrap() + b.derive(ba).await.unwrap(), 0);
            assert_eq!(a.derive_status().await.unwrap().pending, 0);
            let (rows, _) = a
                .egress(EgressQuery {
                    since_unix_ms: 0,
                    until_unix_ms: 600_000,
                    by: "country".into(),
                    limit: 10,
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(rows[0].bytes_sent, 960);
        })
        .await;
    }

    /// A deriver's newest minute per node goes stale when another replica writes the node's
    /// later minutes (a partition that moved): its plain insert of a minute it thinks new
    /// collides, is rolled back to its savepoint and upserted, and the sums stay exact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_minute_another_replica_wrote_first_is_added_to_not_refused() {
        with_schema(|url, schema| async move {
            let a = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            let b = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            let reports = [
                (&a, report_with_flow(1, 90_000, 10)), // a: minute 60,000 is n's newest
                (&b, report_with_flow(2, 150_000, 100)), // b writes minute 120,000 (a does not know)
                (&a, report_with_flow(3, 170_000, 1_000)), // a thinks minute 120,000 new: collides
                (&a, report_with_flow(4, 175_000, 10_000)), // after the collision: upserted again
                (&a, report_with_flow(5, 230_000, 100_000)), // a new minute, new again
            ];
            for (store, r) in &reports {
                assert_eq!(a.ingest(r.clone()).await.unwrap(), IngestOutcome::Stored);
                let queued = a.underived(10).await.unwrap();
                assert_eq!(queued.len(), 1);
                let batch = vec![crate::store::Derivation {
                    queue_id: queued[0].queue_id,
                    report: r.clone(),
                }];
                assert_eq!(store.derive(batch).await.unwrap(), 1, "seq {}", r.seq);
            }
            let minutes = |since: i64, until: i64| {
                let a = &a;
                async move {
                    let (rows, _) = a
                        .egress(EgressQuery {
                            since_unix_ms: since,
                            until_unix_ms: until,
                            by: "country".into(),
                            limit: 10,
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    rows.iter().map(|r| r.bytes_sent).sum::<u64>()
                }
            };
            assert_eq!(minutes(0, 600_000).await, 111_110);
            assert_eq!(minutes(120_000, 180_000).await, 11_100);
            assert_eq!(
                count(&url, &schema, "SELECT COUNT(*) FROM flows_minute").await,
                3,
                "one row per minute"
            );
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_connecting_at_once_migrate_once() {
        with_schema(|url, schema| async move {
            let stores = futures::future::join_all(
                (0..4).map(|_| PostgresStore::connect_with_schema(&url, &schema)),
            )
            .await;
            for s in stores {
                s.unwrap();
            }
            assert_eq!(
                count(&url, &schema, "SELECT COUNT(*) FROM sov_schema_version").await,
                1
            );
            assert_eq!(
                count(&url, &schema, "SELECT MAX(version) FROM sov_schema_version").await,
                SCHEMA_VERSION
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_database_from_a_newer_collector_is_refused() {
        with_schema(|url, schema| async move {
            drop(
                PostgresStore::connect_with_schema(&url, &schema)
                    .await
                    .unwrap(),
            );
            let c = try_connect(&url).await.unwrap();
            c.batch_execute(&format!(
                "UPDATE {}.sov_schema_version SET version = 99",
                quote_ident(&schema)
            ))
            .await
            .unwrap();
            let err = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
                "{err}"
            );
        })
        .await;
    }

    async fn backend_pid(c: &Client) -> i32 {
        c.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    }

    #[tokio::test]
    async fn a_lost_connection_fails_the_calls_that_find_it_dead_and_then_reconnects() {
        with_schema(|url, schema| async move {
            let store = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            store.ingest(report("a", 1, 1)).await.unwrap();
            let writer_pid = backend_pid(&store.writer().await.unwrap().client).await;
            let reader_pid = backend_pid(&store.reader().await.unwrap()).await;
            let admin = try_connect(&url).await.unwrap();
            for pid in [writer_pid, reader_pid] {
                admin
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .unwrap();
            }
            // Calls that find the connection dead fail with a postgres error until the
            // connection task has seen the socket close (a race of a few milliseconds); then the
            // next call reconnects. Agents retry after a backoff of at least 200 ms.
            let mut outcome = store.ingest(report("a", 1, 2)).await;
            for _ in 0..3 {
                let Err(err) = &outcome else { break };
                assert!(matches!(err, StoreError::Postgres { .. }), "{err}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                outcome = store.ingest(report("a", 1, 2)).await;
            }
            assert_eq!(outcome.unwrap(), IngestOutcome::Stored);
            let mut nodes = store.list_nodes("", 10).await;
            for _ in 0..3 {
                let Err(err) = &nodes else { break };
                assert!(matches!(err, StoreError::Postgres { .. }), "{err}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                nodes = store.list_nodes("", 10).await;
            }
            assert_eq!(nodes.unwrap()[0].reports, 2);
            assert_ne!(
                backend_pid(&store.writer().await.unwrap().client).await,
                writer_pid
            );
            // The new connections still use the store's schema.
            assert_eq!(
                count(&url, &schema, "SELECT COUNT(*) FROM reports").await,
                2
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_read_held_up_in_the_server_does_not_hold_up_the_next() {
        with_schema(|url, schema| async move {
            let store = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            store.ingest(report("a", 1, 1)).await.unwrap();
            // A read that waits in the server: an advisory lock another session holds (a key
            // of this test's own, from its schema name, below 2^31 so `pg_locks` shows it
            // whole in `objid`).
            let key = i64::from(
                schema
                    .bytes()
                    .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
                    & 0x7fff_ffff,
            );
            let holder = try_connect(&url).await.unwrap();
            holder.batch_execute("BEGIN").await.unwrap();
            holder
                .execute("SELECT pg_advisory_xact_lock($1)", &[&key])
                .await
                .unwrap();
            let reader = store.reader().await.unwrap();
            let held = tokio::spawn(async move {
                reader
                    .execute("SELECT pg_advisory_xact_lock($1)", &[&key])
                    .await
                    .map(|_| ())
            });
            // Until the server shows that read waiting (with one pipelined reader, every
            // read after it waited behind it).
            let watcher = try_connect(&url).await.unwrap();
            let mut waiting = 0;
            for _ in 0..600 {
                waiting = watcher
                    .query_one(
                        "SELECT COUNT(*) FROM pg_locks
                         WHERE locktype = 'advisory' AND NOT granted AND objid::BIGINT = $1",
                        &[&key],
                    )
                    .await
                    .unwrap()
                    .get::<_, i64>(0);
                if waiting > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(waiting, 1, "the held read never reached the server");
            let nodes = tokio::time::timeout(Duration::from_secs(60), store.list_nodes("", 10))
                .await
                .expect("a read waited behind the held one for 60 s")
                .unwrap();
            assert_eq!(nodes.len(), 1);
            holder.batch_execute("COMMIT").await.unwrap();
            held.await.unwrap().unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn the_reader_runs_without_jit_with_room_to_hash_groups_and_read_only() {
        with_schema(|url, schema| async move {
            let store = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            let reader = store.reader().await.unwrap();
            for (setting, want) in [
                ("jit", "off"),
                ("work_mem", "64MB"),
                ("default_transaction_read_only", "on"),
            ] {
                let got: String = reader
                    .query_one(&format!("SHOW {setting}"), &[])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(got, want, "{setting}");
            }
        })
        .await;
    }

    #[tokio::test]
    async fn open_with_a_postgres_url_uses_the_urls_search_path() {
        with_schema(|url, schema| async move {
            let c = try_connect(&url).await.unwrap();
            c.batch_execute(&format!("CREATE SCHEMA {}", quote_ident(&schema)))
                .await
                .unwrap();
            let sep = if url.contains('?') { '&' } else { '?' };
            let with_path = format!("{url}{sep}options=-csearch_path%3D{schema}");
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::open(&with_path, dir.path()).await.unwrap();
            assert!(
                format!("{store:?}").starts_with("PostgresStore"),
                "{store:?}"
            );
            store.ingest(report("a", 1, 1)).await.unwrap();
            assert_eq!(
                count(&url, &schema, "SELECT COUNT(*) FROM reports").await,
                1
            );
            assert!(!dir.path().join(crate::store::sqlite::DB_FILE).exists());
        })
        .await;
    }

    #[tokio::test]
    async fn an_edited_log_record_is_refused_by_the_database_and_named_by_the_chain() {
        use crate::store::suite::{observation, whole_log};
        use sov_evidence::chain::verify_chain;
        with_schema(|url, schema| async move {
            let store = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
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
            let c = try_connect(&url).await.unwrap();
            c.batch_execute(&format!("SET search_path TO {}", quote_ident(&schema)))
                .await
                .unwrap();
            let edit = "UPDATE breach_log SET body = replace(body, '\"bytes\":2', '\"bytes\":0') WHERE seq = 2";
            let refused = c.execute(edit, &[]).await.unwrap_err();
            let text = format!("{refused:?}");
            assert!(text.contains("append-only"), "{text}");
            assert!(c.execute("DELETE FROM breach_log WHERE seq = 3", &[]).await.is_err());
            assert!(c.batch_execute("TRUNCATE breach_log").await.is_err());
            // The owner can disable the triggers; the chain still tells.
            c.batch_execute("ALTER TABLE breach_log DISABLE TRIGGER USER")
                .await
                .unwrap();
            assert_eq!(c.execute(edit, &[]).await.unwrap(), 1);
            let log = whole_log(&store).await;
            assert_eq!(log[1].body["evidence"]["bytes"], 0);
            let err = verify_chain(log.into_iter()).unwrap_err();
            assert_eq!(err.seq, 2, "{err}");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_observing_breaches_at_once_keep_one_chain_and_one_open_breach_per_key() {
        use crate::breach::BreachChange;
        use crate::store::suite::{observation, whole_log};
        use sov_evidence::chain::verify_chain;
        with_schema(|url, schema| async move {
            let (a, b) = tokio::join!(
                PostgresStore::connect_with_schema(&url, &schema),
                PostgresStore::connect_with_schema(&url, &schema)
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            let run = |s: PostgresStore, tag: i64| async move {
                let mut opened = 0;
                for i in 0..20_i64 {
                    // Both replicas see the same 10 keys, with evidence that changes.
                    let obs = observation(
                        "r",
                        &format!("n{}", i % 10),
                        "s",
                        1000 + i,
                        serde_json::json!({"i": i, "replica": tag}),
                    );
                    if matches!(
                        s.observe_breach(obs).await.unwrap(),
                        BreachChange::Opened(_)
                    ) {
                        opened += 1;
                    }
                }
                opened
            };
            let (x, y) = tokio::join!(run(a.clone(), 1), run(b.clone(), 2));
            assert_eq!(x + y, 10);
            assert_eq!(
                count(
                    &url,
                    &schema,
                    "SELECT COUNT(*) FROM breaches WHERE state = 'open'"
                )
                .await,
                10
            );
            let log = whole_log(&a).await;
            assert_eq!(log.len(), 40);
            assert_eq!(verify_chain(log.into_iter()), Ok(40));
        })
        .await;
    }

    #[test]
    fn a_password_in_a_url_is_hidden() {
        assert_eq!(
            redact_url("postgres://sov:s3cret@db:5432/sov?sslmode=disable"),
            "postgres://sov:***@db:5432/sov?sslmode=disable"
        );
        assert_eq!(redact_url("postgres://sov@db/sov"), "postgres://sov@db/sov");
        assert_eq!(redact_url("sqlite:x"), "sqlite:x");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
