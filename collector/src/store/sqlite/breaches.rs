//! Breaches and the two hash-chained logs (breach log, audit log): folding observations,
//! resolving quiet breaches, and appending to a chain under SQLite's single writer.

use super::*;
use crate::store::rows::BREACH_COLUMNS;
use crate::store::{AUDIT_LOG, BREACH_LOG, ChainedLog};

/// `(seq, hash)` of `log`'s last record.
pub(super) fn last_record(
    tx: &rusqlite::Transaction<'_>,
    log: &ChainedLog,
) -> Result<Option<(u64, String)>, StoreError> {
    let last: Option<(i64, String)> = tx
        .query_row(log.last, [], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(sql(log.reading_last))?;
    last.map(|(seq, hash)| Ok((to_u64(seq, "log seq")?, hash)))
        .transpose()
}

/// Append `r` to `log`, whose last record is `last`, and make it the new `last`: the one
/// appender of the breach log and the audit log.
pub(super) fn append_chained(
    tx: &rusqlite::Transaction<'_>,
    log: &ChainedLog,
    r: LogRecord,
    last: &mut Option<(u64, String)>,
) -> Result<(), StoreError> {
    exec(
        tx,
        log.append,
        params![
            to_i64(r.seq, "log seq")?,
            r.at_unix_ms,
            r.breach_id,
            r.event,
            r.body_json,
            r.prev_hash,
            r.hash
        ],
    )
    .map_err(sql(log.appending))?;
    *last = Some((r.seq, r.hash));
    Ok(())
}

/// `log`'s records after `after_seq`, in order, at most `limit`.
pub(super) fn read_chained(
    conn: &Connection,
    log: &ChainedLog,
    after_seq: u64,
    limit: u32,
) -> Result<Vec<LogRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(log.read).map_err(sql(log.reading))?;
    let mut rows = stmt
        .query(params![to_i64(after_seq, "after_seq")?, i64::from(limit)])
        .map_err(sql(log.reading))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sql(log.reading))? {
        out.push(rows::log_record(row)?);
    }
    Ok(out)
}

impl SqliteStore {
    pub(super) fn observe_breach_blocking(
        conn: &mut Connection,
        obs: &Observation,
    ) -> Result<BreachChange, StoreError> {
        if obs.rule.is_empty() {
            return Err(StoreError::Range(
                "breach observation without a rule".into(),
            ));
        }
        // IMMEDIATE: take the write lock before reading, so that the read-then-write cannot
        // fail half way with another process on the same file.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin observe breach"))?;
        let found = {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {BREACH_COLUMNS} FROM breaches
                     WHERE rule = ?1 AND node = ?2 AND subject = ?3 AND state = 'open'"
                ))
                .map_err(sql("prepare find breach"))?;
            let mut rows = stmt
                .query(params![obs.rule, obs.node, obs.subject])
                .map_err(sql("find breach"))?;
            match rows.next().map_err(sql("find breach"))? {
                Some(row) => Some(crate::store::rows::breach(row)?),
                None => None,
            }
        };
        let mut last = last_record(&tx, &BREACH_LOG)?;
        let change = match found {
            None => {
                let b = Breach::opened(obs, last.as_ref().map_or(1, |(s, _)| s + 1));
                tx.execute(
                    &format!(
                        "INSERT INTO breaches ({BREACH_COLUMNS})
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL, ?10)"
                    ),
                    params![
                        b.breach_id,
                        b.rule,
                        b.node,
                        b.subject,
                        b.severity.as_str(),
                        b.state.as_str(),
                        canonical_json(&b.evidence),
                        b.opened_at_unix_ms,
                        b.last_seen_unix_ms,
                        to_i64(b.count, "breach count")?
                    ],
                )
                .map_err(sql("insert breach"))?;
                append_chained(
                    &tx,
                    &BREACH_LOG,
                    b.log_record(&last, obs.at_unix_ms, EVENT_OPEN),
                    &mut last,
                )?;
                BreachChange::Opened(b)
            }
            Some((mut b, stored_evidence)) => {
                let changed = b.fold(obs, &stored_evidence);
                tx.execute(
                    "UPDATE breaches SET severity = ?2, evidence = ?3, last_seen_ms = ?4, obs_count = ?5
                     WHERE breach_id = ?1",
                    params![
                        b.breach_id,
                        b.severity.as_str(),
                        canonical_json(&b.evidence),
                        b.last_seen_unix_ms,
                        to_i64(b.count, "breach count")?
                    ],
                )
                .map_err(sql("update breach"))?;
                if changed {
                    append_chained(
                        &tx,
                        &BREACH_LOG,
                        b.log_record(&last, obs.at_unix_ms, EVENT_UPDATED),
                        &mut last,
                    )?;
                    BreachChange::Updated(b)
                } else {
                    BreachChange::Unchanged(b)
                }
            }
        };
        tx.commit().map_err(sql("commit observe breach"))?;
        Ok(change)
    }

    pub(super) fn resolve_quiet_breaches_blocking(
        conn: &mut Connection,
        rule: &str,
        quiet_before_unix_ms: i64,
        at_unix_ms: i64,
    ) -> Result<Vec<Breach>, StoreError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin resolve breaches"))?;
        let mut quiet = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {BREACH_COLUMNS} FROM breaches
                     WHERE rule = ?1 AND state = 'open' AND last_seen_ms < ?2
                     ORDER BY breach_id"
                ))
                .map_err(sql("prepare quiet breaches"))?;
            let mut rows = stmt
                .query(params![rule, quiet_before_unix_ms])
                .map_err(sql("find quiet breaches"))?;
            while let Some(row) = rows.next().map_err(sql("find quiet breaches"))? {
                quiet.push(crate::store::rows::breach(row)?.0);
            }
        }
        let mut last = last_record(&tx, &BREACH_LOG)?;
        for b in &mut quiet {
            b.state = BreachState::Resolved;
            b.resolved_at_unix_ms = Some(at_unix_ms);
            tx.execute(
                "UPDATE breaches SET state = 'resolved', resolved_ms = ?2 WHERE breach_id = ?1",
                params![b.breach_id, at_unix_ms],
            )
            .map_err(sql("resolve breach"))?;
            append_chained(
                &tx,
                &BREACH_LOG,
                b.log_record(&last, at_unix_ms, EVENT_RESOLVED),
                &mut last,
            )?;
        }
        tx.commit().map_err(sql("commit resolve breaches"))?;
        Ok(quiet)
    }

    pub(super) fn list_breaches_blocking(
        conn: &Connection,
        f: &BreachFilter,
    ) -> Result<Vec<Breach>, StoreError> {
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {BREACH_COLUMNS} FROM breaches
                 WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR rule = ?2)
                   AND (?3 IS NULL OR state = 'open' OR resolved_ms >= ?3)
                 ORDER BY opened_ms DESC, breach_id
                 LIMIT ?4"
            ))
            .map_err(sql("prepare list breaches"))?;
        let mut rows = stmt
            .query(params![
                f.state.map(BreachState::as_str),
                f.rule,
                f.since_unix_ms,
                i64::from(f.limit)
            ])
            .map_err(sql("list breaches"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql("list breaches"))? {
            out.push(crate::store::rows::breach(row)?.0);
        }
        Ok(out)
    }

    pub(super) fn breach_log_blocking(
        conn: &Connection,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<LogRecord>, StoreError> {
        read_chained(conn, &BREACH_LOG, after_seq, limit)
    }
}

impl SqliteStore {
    pub(super) fn append_audit_blocking(
        conn: &mut Connection,
        entry: &AuditEntry,
    ) -> Result<AuditRecord, StoreError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin append audit"))?;
        let mut last = last_record(&tx, &AUDIT_LOG)?;
        let r = LogRecord::next(
            last.as_ref().map(|(s, h)| (*s, h.as_str())),
            entry.at_unix_ms,
            &entry.actor(),
            &entry.call,
            entry.body(),
        );
        append_chained(&tx, &AUDIT_LOG, r.clone(), &mut last)?;
        tx.commit().map_err(sql("commit audit record"))?;
        Ok(AuditRecord::from_log_record(r))
    }

    pub(super) fn audit_log_blocking(
        conn: &Connection,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(read_chained(conn, &AUDIT_LOG, after_seq, limit)?
            .into_iter()
            .map(AuditRecord::from_log_record)
            .collect())
    }
}

pub(super) async fn append_audit(
    store: &SqliteStore,
    entry: AuditEntry,
) -> Result<AuditRecord, StoreError> {
    let writer = store.writer.clone();
    tokio::task::spawn_blocking(move || {
        SqliteStore::append_audit_blocking(&mut lock(&writer), &entry)
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn audit_log(
    store: &SqliteStore,
    after_seq: u64,
    limit: u32,
) -> Result<Vec<AuditRecord>, StoreError> {
    let reader = store.reader.clone();
    tokio::task::spawn_blocking(move || {
        reader.with(|conn| SqliteStore::audit_log_blocking(conn, after_seq, limit))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn observe_breach(
    store: &SqliteStore,
    obs: Observation,
) -> Result<BreachChange, StoreError> {
    let writer = store.writer.clone();
    tokio::task::spawn_blocking(move || {
        SqliteStore::observe_breach_blocking(&mut lock(&writer), &obs)
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn resolve_quiet_breaches(
    store: &SqliteStore,
    rule: &str,
    quiet_before_unix_ms: i64,
    at_unix_ms: i64,
) -> Result<Vec<Breach>, StoreError> {
    let writer = store.writer.clone();
    let rule = rule.to_owned();
    tokio::task::spawn_blocking(move || {
        SqliteStore::resolve_quiet_breaches_blocking(
            &mut lock(&writer),
            &rule,
            quiet_before_unix_ms,
            at_unix_ms,
        )
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn record_evaluation(
    store: &SqliteStore,
    observations: Vec<Observation>,
    quiet: Vec<(String, i64)>,
    at_unix_ms: i64,
) -> Result<(Vec<BreachChange>, Vec<Breach>), StoreError> {
    let writer = store.writer.clone();
    tokio::task::spawn_blocking(move || {
        let mut w = lock(&writer);
        let mut changes = Vec::with_capacity(observations.len());
        for obs in &observations {
            changes.push(SqliteStore::observe_breach_blocking(&mut w, obs)?);
        }
        let mut resolved = Vec::new();
        for (rule, quiet_before) in &quiet {
            resolved.extend(SqliteStore::resolve_quiet_breaches_blocking(
                &mut w,
                rule,
                *quiet_before,
                at_unix_ms,
            )?);
        }
        Ok((changes, resolved))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn list_breaches(
    store: &SqliteStore,
    filter: BreachFilter,
) -> Result<Vec<Breach>, StoreError> {
    let reader = store.reader.clone();
    tokio::task::spawn_blocking(move || {
        reader.with(|conn| SqliteStore::list_breaches_blocking(conn, &filter))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn breach_log(
    store: &SqliteStore,
    after_seq: u64,
    limit: u32,
) -> Result<Vec<LogRecord>, StoreError> {
    let reader = store.reader.clone();
    tokio::task::spawn_blocking(move || {
        reader.with(|conn| SqliteStore::breach_log_blocking(conn, after_seq, limit))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn breach_log_end(store: &SqliteStore) -> Result<u64, StoreError> {
    store
        .read(|c| {
            let seq: i64 = c
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM breach_log", [], |r| {
                    r.get(0)
                })
                .map_err(sql("read breach log end"))?;
            to_u64(seq, "log seq")
        })
        .await
}

pub(super) async fn chain_head(
    store: &SqliteStore,
    log: &'static ChainedLog,
) -> Result<(u64, String), StoreError> {
    store
        .read(move |c| {
            let last: Option<(i64, String)> = c
                .query_row(log.last, [], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(sql(log.reading_last))?;
            match last {
                Some((seq, hash)) => Ok((to_u64(seq, "log seq")?, hash)),
                None => Ok((0, sov_evidence::chain::GENESIS_HASH.to_owned())),
            }
        })
        .await
}

pub(super) async fn add_checkpoint(
    store: &SqliteStore,
    log: &str,
    seq: u64,
    hash: &str,
    at_unix_ms: i64,
    signed: &str,
) -> Result<(), StoreError> {
    let (log, hash, signed) = (log.to_owned(), hash.to_owned(), signed.to_owned());
    store
        .write(move |c| {
            exec(
                c,
                "INSERT INTO chain_checkpoints (log, seq, hash, at_ms, signed)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (log, seq) DO NOTHING",
                params![
                    log,
                    to_i64(seq, "checkpoint seq")?,
                    hash,
                    at_unix_ms,
                    signed
                ],
            )
            .map_err(sql("keep checkpoint"))?;
            Ok(())
        })
        .await
}

pub(super) async fn checkpoints(
    store: &SqliteStore,
    log: &str,
    after_seq: Option<u64>,
    limit: u32,
) -> Result<Vec<(u64, String)>, StoreError> {
    let log = log.to_owned();
    let after = match after_seq {
        Some(s) => to_i64(s, "after_seq")?,
        None => -1,
    };
    store
        .read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT seq, signed FROM chain_checkpoints WHERE log = ?1 AND seq > ?2
                     ORDER BY seq LIMIT ?3",
                )
                .map_err(sql("read checkpoints"))?;
            let mut rows = stmt
                .query(params![log, after, i64::from(limit)])
                .map_err(sql("read checkpoints"))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(sql("read checkpoints"))? {
                let seq: i64 = row.get(0).map_err(sql("read checkpoints"))?;
                out.push((
                    to_u64(seq, "checkpoint seq")?,
                    row.get(1).map_err(sql("read checkpoints"))?,
                ));
            }
            Ok(out)
        })
        .await
}

pub(super) async fn latest_checkpoint(
    store: &SqliteStore,
    log: &str,
) -> Result<Option<String>, StoreError> {
    let log = log.to_owned();
    store
        .read(move |c| {
            c.query_row(
                "SELECT signed FROM chain_checkpoints WHERE log = ?1 ORDER BY seq DESC LIMIT 1",
                [log],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read latest checkpoint"))
        })
        .await
}
