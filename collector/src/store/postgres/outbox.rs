//! The alert outbox (cursor, rows, settling, counters) and the replicas' leases.

use super::*;

pub(super) async fn outbox_cursor(
    store: &PostgresStore,
    sink: &str,
) -> Result<Option<u64>, StoreError> {
    let client = store.reader().await?;
    let row = client
        .query_opt(
            "SELECT after_seq FROM alert_cursor WHERE sink = $1",
            &[&sink],
        )
        .await
        .map_err(pg("read outbox cursor"))?;
    row.map(|r| get_u64(&r, 0, "read outbox cursor"))
        .transpose()
}

pub(super) async fn outbox_enqueue(
    store: &PostgresStore,
    sink: &str,
    items: Vec<OutboxItem>,
    cursor: u64,
    now_unix_ms: i64,
) -> Result<(), StoreError> {
    let mut w = store.writer().await?;
    let tx = w.client.transaction().await.map_err(pg("begin enqueue"))?;
    for it in &items {
        tx.execute(
            "INSERT INTO alert_outbox (sink, log_seq, breach_id, event, payload, state,
                 attempts, next_attempt_ms, last_error, created_ms, settled_ms)
             VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, '', $6, NULL)
             ON CONFLICT (sink, log_seq) DO NOTHING",
            &[
                &sink,
                &to_i64(it.log_seq, "log seq")?,
                &it.breach_id,
                &it.event,
                &it.payload,
                &now_unix_ms,
            ],
        )
        .await
        .map_err(pg("enqueue alert"))?;
    }
    tx.execute(
        "INSERT INTO alert_cursor (sink, after_seq) VALUES ($1, $2)
         ON CONFLICT (sink) DO UPDATE SET after_seq = GREATEST(alert_cursor.after_seq, excluded.after_seq)",
        &[&sink, &to_i64(cursor, "outbox cursor")?],
    )
    .await
    .map_err(pg("move outbox cursor"))?;
    tx.commit().await.map_err(pg("commit enqueue"))
}

pub(super) async fn outbox_head(
    store: &PostgresStore,
    sink: &str,
) -> Result<Option<OutboxRow>, StoreError> {
    let client = store.reader().await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT {} FROM alert_outbox WHERE sink = $1 AND state = 'pending'
                 ORDER BY log_seq LIMIT 1",
                rows::OUTBOX_COLUMNS
            ),
            &[&sink],
        )
        .await
        .map_err(pg("read outbox head"))?;
    row.map(|r| rows::outbox_row(&r, sink)).transpose()
}

pub(super) async fn outbox_settle(
    store: &PostgresStore,
    sink: &str,
    log_seq: u64,
    settle: Settle,
) -> Result<(), StoreError> {
    let seq = to_i64(log_seq, "log seq")?;
    let w = store.writer().await?;
    let n = match &settle {
        Settle::Delivered { at_unix_ms } => {
            w.client
                .execute(
                    "UPDATE alert_outbox SET state = 'delivered', settled_ms = $3
                     WHERE sink = $1 AND log_seq = $2 AND state = 'pending'",
                    &[&sink, &seq, at_unix_ms],
                )
                .await
        }
        Settle::Retry {
            attempts,
            next_attempt_unix_ms,
            error,
        } => {
            w.client
                .execute(
                    "UPDATE alert_outbox SET attempts = $3, next_attempt_ms = $4, last_error = $5
                     WHERE sink = $1 AND log_seq = $2 AND state = 'pending'",
                    &[&sink, &seq, &i64::from(*attempts), next_attempt_unix_ms, error],
                )
                .await
        }
        Settle::Failed {
            attempts,
            at_unix_ms,
            error,
        } => {
            w.client
                .execute(
                    "UPDATE alert_outbox SET state = 'failed', attempts = $3, settled_ms = $4, last_error = $5
                     WHERE sink = $1 AND log_seq = $2 AND state = 'pending'",
                    &[&sink, &seq, &i64::from(*attempts), at_unix_ms, error],
                )
                .await
        }
    }
    .map_err(pg("settle outbox row"))?;
    if n == 0 {
        tracing::warn!(sink, log_seq = seq, "outbox row was already settled");
    }
    Ok(())
}

pub(super) async fn outbox_stats(store: &PostgresStore) -> Result<Vec<SinkStats>, StoreError> {
    let client = store.reader().await?;
    let rows = client
        .query(
            "SELECT sink,
                    COUNT(*) FILTER (WHERE state = 'pending'),
                    COUNT(*) FILTER (WHERE state = 'delivered'),
                    COUNT(*) FILTER (WHERE state = 'failed'),
                    COALESCE(SUM(attempts), 0)::BIGINT
             FROM alert_outbox GROUP BY sink ORDER BY sink COLLATE \"C\"",
            &[],
        )
        .await
        .map_err(pg("outbox stats"))?;
    rows.iter().map(rows::sink_stats).collect()
}

pub(super) async fn take_lease(
    store: &PostgresStore,
    name: &str,
    holder: &str,
    now_unix_ms: i64,
    ttl_ms: i64,
) -> Result<bool, StoreError> {
    let w = store.writer().await?;
    let rows = w
        .client
        .query(
            "INSERT INTO leases (name, holder, until_ms) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms
             WHERE leases.holder = excluded.holder OR leases.until_ms < $4
             RETURNING holder",
            &[
                &name,
                &holder,
                &now_unix_ms.saturating_add(ttl_ms),
                &now_unix_ms,
            ],
        )
        .await
        .map_err(pg("take lease"))?;
    Ok(rows.len() == 1)
}
