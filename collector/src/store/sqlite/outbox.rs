//! The alert outbox (cursor, rows, settling, counters) and the replicas' leases.

use super::*;

pub(super) async fn outbox_cursor(
    store: &SqliteStore,
    sink: &str,
) -> Result<Option<u64>, StoreError> {
    let sink = sink.to_owned();
    store
        .read(move |c| {
            let seq: Option<i64> = c
                .query_row(
                    "SELECT after_seq FROM alert_cursor WHERE sink = ?1",
                    params![sink],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql("read outbox cursor"))?;
            seq.map(|s| to_u64(s, "outbox cursor")).transpose()
        })
        .await
}

pub(super) async fn outbox_enqueue(
    store: &SqliteStore,
    sink: &str,
    items: Vec<OutboxItem>,
    cursor: u64,
    now_unix_ms: i64,
) -> Result<(), StoreError> {
    let sink = sink.to_owned();
    store.write(move |c| {
        let tx = c.transaction().map_err(sql("begin enqueue"))?;
        for it in &items {
            tx.execute(
                "INSERT OR IGNORE INTO alert_outbox (sink, log_seq, breach_id, event, payload, state,
                     attempts, next_attempt_ms, last_error, created_ms, settled_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, '', ?6, NULL)",
                params![
                    sink,
                    to_i64(it.log_seq, "log seq")?,
                    it.breach_id,
                    it.event,
                    it.payload,
                    now_unix_ms
                ],
            )
            .map_err(sql("enqueue alert"))?;
        }
        tx.execute(
            "INSERT INTO alert_cursor (sink, after_seq) VALUES (?1, ?2)
             ON CONFLICT (sink) DO UPDATE SET after_seq = max(after_seq, excluded.after_seq)",
            params![sink, to_i64(cursor, "outbox cursor")?],
        )
        .map_err(sql("move outbox cursor"))?;
        tx.commit().map_err(sql("commit enqueue"))
    })
    .await
}

pub(super) async fn outbox_head(
    store: &SqliteStore,
    sink: &str,
) -> Result<Option<OutboxRow>, StoreError> {
    let sink = sink.to_owned();
    store
        .read(move |c| {
            c.query_row(
                &format!(
                    "SELECT {} FROM alert_outbox WHERE sink = ?1 AND state = 'pending'
                     ORDER BY log_seq LIMIT 1",
                    rows::OUTBOX_COLUMNS
                ),
                params![sink],
                |r| Ok(rows::outbox_row(r, &sink)),
            )
            .optional()
            .map_err(sql("read outbox head"))?
            .transpose()
        })
        .await
}

pub(super) async fn outbox_settle(
    store: &SqliteStore,
    sink: &str,
    log_seq: u64,
    settle: Settle,
) -> Result<(), StoreError> {
    let sink = sink.to_owned();
    let seq = to_i64(log_seq, "log seq")?;
    store.write(move |c| {
        let n = match &settle {
            Settle::Delivered { at_unix_ms } => c.execute(
                "UPDATE alert_outbox SET state = 'delivered', settled_ms = ?3
                 WHERE sink = ?1 AND log_seq = ?2 AND state = 'pending'",
                params![sink, seq, at_unix_ms],
            ),
            Settle::Retry {
                attempts,
                next_attempt_unix_ms,
                error,
            } => c.execute(
                "UPDATE alert_outbox SET attempts = ?3, next_attempt_ms = ?4, last_error = ?5
                 WHERE sink = ?1 AND log_seq = ?2 AND state = 'pending'",
                params![sink, seq, attempts, next_attempt_unix_ms, error],
            ),
            Settle::Failed {
                attempts,
                at_unix_ms,
                error,
            } => c.execute(
                "UPDATE alert_outbox SET state = 'failed', attempts = ?3, settled_ms = ?4, last_error = ?5
                 WHERE sink = ?1 AND log_seq = ?2 AND state = 'pending'",
                params![sink, seq, attempts, at_unix_ms, error],
            ),
        }
        .map_err(sql("settle outbox row"))?;
        if n == 0 {
            tracing::warn!(sink = %sink, log_seq = seq, "outbox row was already settled");
        }
        Ok(())
    })
    .await
}

pub(super) async fn outbox_stats(store: &SqliteStore) -> Result<Vec<SinkStats>, StoreError> {
    store
        .read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT sink,
                        SUM(state = 'pending'), SUM(state = 'delivered'), SUM(state = 'failed'),
                        SUM(attempts)
                 FROM alert_outbox GROUP BY sink ORDER BY sink",
                )
                .map_err(sql("prepare outbox stats"))?;
            let mut rows = stmt.query([]).map_err(sql("outbox stats"))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(sql("outbox stats"))? {
                out.push(rows::sink_stats(r)?);
            }
            Ok(out)
        })
        .await
}

pub(super) async fn take_lease(
    store: &SqliteStore,
    name: &str,
    holder: &str,
    now_unix_ms: i64,
    ttl_ms: i64,
) -> Result<bool, StoreError> {
    let (name, holder) = (name.to_owned(), holder.to_owned());
    store.write(move |c| {
        let n = c
            .execute(
                "INSERT INTO leases (name, holder, until_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms
                 WHERE leases.holder = excluded.holder OR leases.until_ms < ?4",
                params![name, holder, now_unix_ms.saturating_add(ttl_ms), now_unix_ms],
            )
            .map_err(sql("take lease"))?;
        Ok(n == 1)
    })
    .await
}
