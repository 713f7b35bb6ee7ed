//! A report's container rows (`containers_minute`, see [`crate::store::containers`]): written
//! after the report's other rows, in the same transaction.

use super::*;
use crate::store::containers::{CONTAINER_COLUMNS, rows_of};

/// Upsert the report's container rows (the latest report's identity of a (minute, pid) wins).
pub(super) fn apply_containers(
    tx: &rusqlite::Transaction<'_>,
    r: &IncomingReport,
) -> Result<(), StoreError> {
    let rows = rows_of(r);
    if rows.is_empty() {
        return Ok(());
    }
    let mut stmt = tx
        .prepare_cached(&format!(
            "INSERT OR REPLACE INTO containers_minute (node, {CONTAINER_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
        ))
        .map_err(sql("prepare container row"))?;
    for c in &rows {
        stmt.execute(params![
            r.node,
            c.minute_ms,
            c.pid,
            c.runtime,
            c.container_id,
            c.container_name,
            c.image,
            c.image_digest,
            c.pod_namespace,
            c.pod_name,
            c.pod_uid,
            c.source
        ])
        .map_err(sql("insert container row"))?;
    }
    Ok(())
}
