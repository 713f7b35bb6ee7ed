//! Breaches and the two hash-chained logs (breach log, audit log): folding observations,
//! resolving quiet breaches, and appending to a chain under an advisory lock so that
//! replicas keep one chain.

use super::*;
use crate::store::rows::BREACH_COLUMNS;
use crate::store::{AUDIT_LOG, BREACH_LOG, ChainedLog};

/// Key of the advisory lock every breach transaction holds ("sov_brlg"): it serialises breach
/// changes and log appends across replicas, so sequence numbers and links stay consistent.
pub(super) const BREACH_LOCK_KEY: i64 = 0x736f_765f_6272_6c67;

/// Key of the advisory lock every audit append holds ("sov_audt").
pub(super) const AUDIT_LOCK_KEY: i64 = 0x736f_765f_6175_6474;

/// Take the breach lock, then read `(seq, hash)` of the log's last record. Every breach
/// transaction calls this before reading any breach, so that replicas take turns.
pub(super) async fn lock_breaches(tx: &Tx<'_>) -> Result<Option<(u64, String)>, StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&BREACH_LOCK_KEY])
        .await
        .map_err(pg("lock breaches"))?;
    last_record(tx, &BREACH_LOG).await
}

/// `(seq, hash)` of `log`'s last record.
pub(super) async fn last_record(
    tx: &Tx<'_>,
    log: &ChainedLog,
) -> Result<Option<(u64, String)>, StoreError> {
    let row = tx
        .query_opt(log.last, &[])
        .await
        .map_err(pg(log.reading_last))?;
    row.map(|r| {
        Ok((
            get_u64(&r, 0, log.reading_last)?,
            get(&r, 1, log.reading_last)?,
        ))
    })
    .transpose()
}

/// Append `r` to `log`, whose last record is `last`, and make it the new `last`: the one
/// appender of the breach log and the audit log (callers hold the log's advisory lock).
pub(super) async fn append_chained(
    tx: &Tx<'_>,
    log: &ChainedLog,
    r: LogRecord,
    last: &mut Option<(u64, String)>,
) -> Result<(), StoreError> {
    tx.execute(
        log.append,
        &[
            &to_i64(r.seq, "log seq")?,
            &r.at_unix_ms,
            &r.breach_id,
            &r.event,
            &r.body_json,
            &r.prev_hash,
            &r.hash,
        ],
    )
    .await
    .map_err(pg(log.appending))?;
    *last = Some((r.seq, r.hash));
    Ok(())
}

/// `log`'s records after `after_seq`, in order, at most `limit`.
pub(super) async fn read_chained(
    store: &PostgresStore,
    log: &ChainedLog,
    after_seq: u64,
    limit: u32,
) -> Result<Vec<LogRecord>, StoreError> {
    let client = store.reader().await?;
    let rows = client
        .query(
            log.read,
            &[&to_i64(after_seq, "after_seq")?, &i64::from(limit)],
        )
        .await
        .map_err(pg(log.reading))?;
    rows.iter().map(rows::log_record).collect()
}

/// One observe-breach transaction.
pub(super) async fn observe_once(
    w: &mut Writer,
    obs: &Observation,
) -> Result<BreachChange, StoreError> {
    let tx = w.client.transaction().await.map_err(pg("begin"))?;
    let mut last = lock_breaches(&tx).await?;
    let found = tx
        .query_opt(
            &format!(
                "SELECT {BREACH_COLUMNS} FROM breaches
                 WHERE rule = $1 AND node = $2 AND subject = $3 AND state = 'open'"
            ),
            &[&obs.rule, &obs.node, &obs.subject],
        )
        .await
        .map_err(pg("find breach"))?;
    let change = match found {
        None => {
            let b = Breach::opened(obs, last.as_ref().map_or(1, |(s, _)| s + 1));
            tx.execute(
                &format!(
                    "INSERT INTO breaches ({BREACH_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, $10)"
                ),
                &[
                    &b.breach_id,
                    &b.rule,
                    &b.node,
                    &b.subject,
                    &b.severity.as_str(),
                    &b.state.as_str(),
                    &canonical_json(&b.evidence),
                    &b.opened_at_unix_ms,
                    &b.last_seen_unix_ms,
                    &to_i64(b.count, "breach count")?,
                ],
            )
            .await
            .map_err(pg("insert breach"))?;
            append_chained(
                &tx,
                &BREACH_LOG,
                b.log_record(&last, obs.at_unix_ms, EVENT_OPEN),
                &mut last,
            )
            .await?;
            BreachChange::Opened(b)
        }
        Some(row) => {
            let (mut b, stored_evidence) = crate::store::rows::breach(&row)?;
            let changed = b.fold(obs, &stored_evidence);
            tx.execute(
                "UPDATE breaches SET severity = $2, evidence = $3, last_seen_ms = $4, obs_count = $5
                 WHERE breach_id = $1",
                &[
                    &b.breach_id,
                    &b.severity.as_str(),
                    &canonical_json(&b.evidence),
                    &b.last_seen_unix_ms,
                    &to_i64(b.count, "breach count")?,
                ],
            )
            .await
            .map_err(pg("update breach"))?;
            if changed {
                append_chained(
                    &tx,
                    &BREACH_LOG,
                    b.log_record(&last, obs.at_unix_ms, EVENT_UPDATED),
                    &mut last,
                )
                .await?;
                BreachChange::Updated(b)
            } else {
                BreachChange::Unchanged(b)
            }
        }
    };
    tx.commit().await.map_err(pg("commit observe breach"))?;
    Ok(change)
}

/// One resolve-quiet-breaches transaction.
pub(super) async fn resolve_once(
    w: &mut Writer,
    rule: &str,
    quiet_before_unix_ms: i64,
    at_unix_ms: i64,
) -> Result<Vec<Breach>, StoreError> {
    let tx = w.client.transaction().await.map_err(pg("begin"))?;
    let mut last = lock_breaches(&tx).await?;
    let rows = tx
        .query(
            &format!(
                "SELECT {BREACH_COLUMNS} FROM breaches
                 WHERE rule = $1 AND state = 'open' AND last_seen_ms < $2
                 ORDER BY breach_id COLLATE \"C\""
            ),
            &[&rule, &quiet_before_unix_ms],
        )
        .await
        .map_err(pg("find quiet breaches"))?;
    let mut quiet = Vec::with_capacity(rows.len());
    for row in &rows {
        let (mut b, _) = crate::store::rows::breach(row)?;
        b.state = BreachState::Resolved;
        b.resolved_at_unix_ms = Some(at_unix_ms);
        tx.execute(
            "UPDATE breaches SET state = 'resolved', resolved_ms = $2 WHERE breach_id = $1",
            &[&b.breach_id, &at_unix_ms],
        )
        .await
        .map_err(pg("resolve breach"))?;
        append_chained(
            &tx,
            &BREACH_LOG,
            b.log_record(&last, at_unix_ms, EVENT_RESOLVED),
            &mut last,
        )
        .await?;
        quiet.push(b);
    }
    tx.commit().await.map_err(pg("commit resolve breaches"))?;
    Ok(quiet)
}

/// One audit append transaction, under the audit lock.
pub(super) async fn append_audit_once(
    w: &mut Writer,
    entry: &AuditEntry,
) -> Result<AuditRecord, StoreError> {
    let tx = w.client.transaction().await.map_err(pg("begin"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK_KEY])
        .await
        .map_err(pg("lock audit log"))?;
    let mut last = last_record(&tx, &AUDIT_LOG).await?;
    let r = LogRecord::next(
        last.as_ref().map(|(s, h)| (*s, h.as_str())),
        entry.at_unix_ms,
        &entry.actor(),
        &entry.call,
        entry.body(),
    );
    append_chained(&tx, &AUDIT_LOG, r.clone(), &mut last).await?;
    tx.commit().await.map_err(pg("commit audit record"))?;
    Ok(AuditRecord::from_log_record(r))
}

pub(super) async fn append_audit(
    store: &PostgresStore,
    entry: AuditEntry,
) -> Result<AuditRecord, StoreError> {
    let mut w = store.writer().await?;
    let mut attempt = 1;
    loop {
        match append_audit_once(&mut w, &entry).await {
            Err(e) if attempt < INGEST_ATTEMPTS && retryable(&e) => attempt += 1,
            outcome => return outcome,
        }
    }
}

pub(super) async fn audit_log(
    store: &PostgresStore,
    after_seq: u64,
    limit: u32,
) -> Result<Vec<AuditRecord>, StoreError> {
    Ok(read_chained(store, &AUDIT_LOG, after_seq, limit)
        .await?
        .into_iter()
        .map(AuditRecord::from_log_record)
        .collect())
}

pub(super) async fn observe_breach(
    store: &PostgresStore,
    obs: Observation,
) -> Result<BreachChange, StoreError> {
    if obs.rule.is_empty() {
        return Err(StoreError::Range(
            "breach observation without a rule".into(),
        ));
    }
    let mut w = store.writer().await?;
    let mut attempt = 1;
    loop {
        match observe_once(&mut w, &obs).await {
            Err(e) if attempt < INGEST_ATTEMPTS && retryable(&e) => attempt += 1,
            outcome => return outcome,
        }
    }
}

pub(super) async fn resolve_quiet_breaches(
    store: &PostgresStore,
    rule: &str,
    quiet_before_unix_ms: i64,
    at_unix_ms: i64,
) -> Result<Vec<Breach>, StoreError> {
    let mut w = store.writer().await?;
    let mut attempt = 1;
    loop {
        match resolve_once(&mut w, rule, quiet_before_unix_ms, at_unix_ms).await {
            Err(e) if attempt < INGEST_ATTEMPTS && retryable(&e) => attempt += 1,
            outcome => return outcome,
        }
    }
}

pub(super) async fn record_evaluation(
    store: &PostgresStore,
    observations: Vec<Observation>,
    quiet: Vec<(String, i64)>,
    at_unix_ms: i64,
) -> Result<(Vec<BreachChange>, Vec<Breach>), StoreError> {
    if observations.iter().any(|o| o.rule.is_empty()) {
        return Err(StoreError::Range(
            "breach observation without a rule".into(),
        ));
    }
    let mut w = store.writer().await?;
    let mut changes = Vec::with_capacity(observations.len());
    for obs in &observations {
        let mut attempt = 1;
        changes.push(loop {
            match observe_once(&mut w, obs).await {
                Err(e) if attempt < INGEST_ATTEMPTS && retryable(&e) => attempt += 1,
                outcome => break outcome?,
            }
        });
    }
    let mut resolved = Vec::new();
    for (rule, quiet_before) in &quiet {
        let mut attempt = 1;
        resolved.extend(loop {
            match resolve_once(&mut w, rule, *quiet_before, at_unix_ms).await {
                Err(e) if attempt < INGEST_ATTEMPTS && retryable(&e) => attempt += 1,
                outcome => break outcome?,
            }
        });
    }
    Ok((changes, resolved))
}

pub(super) async fn list_breaches(
    store: &PostgresStore,
    filter: BreachFilter,
) -> Result<Vec<Breach>, StoreError> {
    let client = store.reader().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {BREACH_COLUMNS} FROM breaches
                 WHERE ($1::TEXT IS NULL OR state = $1::TEXT)
                   AND ($2::TEXT IS NULL OR rule = $2::TEXT)
                   AND ($3::BIGINT IS NULL OR state = 'open' OR resolved_ms >= $3::BIGINT)
                 ORDER BY opened_ms DESC, breach_id COLLATE \"C\"
                 LIMIT $4::BIGINT"
            ),
            &[
                &filter.state.map(BreachState::as_str),
                &filter.rule,
                &filter.since_unix_ms,
                &i64::from(filter.limit),
            ],
        )
        .await
        .map_err(pg("list breaches"))?;
    rows.iter()
        .map(|r| Ok(crate::store::rows::breach(r)?.0))
        .collect()
}

pub(super) async fn breach_log(
    store: &PostgresStore,
    after_seq: u64,
    limit: u32,
) -> Result<Vec<LogRecord>, StoreError> {
    read_chained(store, &BREACH_LOG, after_seq, limit).await
}

pub(super) async fn breach_log_end(store: &PostgresStore) -> Result<u64, StoreError> {
    let client = store.reader().await?;
    let row = client
        .query_one("SELECT COALESCE(MAX(seq), 0)::BIGINT FROM breach_log", &[])
        .await
        .map_err(pg("read breach log end"))?;
    get_u64(&row, 0, "read breach log end")
}

pub(super) async fn chain_head(
    store: &PostgresStore,
    log: &'static ChainedLog,
) -> Result<(u64, String), StoreError> {
    let client = store.reader().await?;
    let row = client
        .query_opt(log.last, &[])
        .await
        .map_err(pg(log.reading_last))?;
    match row {
        Some(r) => Ok((
            get_u64(&r, 0, log.reading_last)?,
            get(&r, 1, log.reading_last)?,
        )),
        None => Ok((0, sov_evidence::chain::GENESIS_HASH.to_owned())),
    }
}

pub(super) async fn add_checkpoint(
    store: &PostgresStore,
    log: &str,
    seq: u64,
    hash: &str,
    at_unix_ms: i64,
    signed: &str,
) -> Result<(), StoreError> {
    let w = store.writer().await?;
    w.client
        .execute(
            "INSERT INTO chain_checkpoints (log, seq, hash, at_ms, signed)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (log, seq) DO NOTHING",
            &[
                &log,
                &to_i64(seq, "checkpoint seq")?,
                &hash,
                &at_unix_ms,
                &signed,
            ],
        )
        .await
        .map_err(pg("keep checkpoint"))?;
    Ok(())
}

pub(super) async fn checkpoints(
    store: &PostgresStore,
    log: &str,
    after_seq: Option<u64>,
    limit: u32,
) -> Result<Vec<(u64, String)>, StoreError> {
    let after = match after_seq {
        Some(s) => to_i64(s, "after_seq")?,
        None => -1,
    };
    let client = store.reader().await?;
    let rows = client
        .query(
            "SELECT seq, signed FROM chain_checkpoints WHERE log = $1 AND seq > $2
             ORDER BY seq LIMIT $3",
            &[&log, &after, &i64::from(limit)],
        )
        .await
        .map_err(pg("read checkpoints"))?;
    rows.iter()
        .map(|r| {
            Ok((
                get_u64(r, 0, "read checkpoints")?,
                get(r, 1, "read checkpoints")?,
            ))
        })
        .collect()
}

pub(super) async fn latest_checkpoint(
    store: &PostgresStore,
    log: &str,
) -> Result<Option<String>, StoreError> {
    let client = store.reader().await?;
    let row = client
        .query_opt(
            "SELECT signed FROM chain_checkpoints WHERE log = $1 ORDER BY seq DESC LIMIT 1",
            &[&log],
        )
        .await
        .map_err(pg("read latest checkpoint"))?;
    row.map(|r| get(&r, 0, "read latest checkpoint"))
        .transpose()
}
