//! A report's container rows (`containers_minute`, see [`crate::store::containers`]): one
//! statement per report, written after the report's other rows in the same transaction.

use super::*;
use crate::store::containers::{CONTAINER_COLUMNS, rows_of};

/// Upsert the report's container rows (the latest report's identity of a (minute, pid) wins).
pub(super) async fn apply_containers(tx: &Tx<'_>, r: &IncomingReport) -> Result<(), StoreError> {
    let rows = rows_of(r);
    if rows.is_empty() {
        return Ok(());
    }
    let minute: Vec<i64> = rows.iter().map(|c| c.minute_ms).collect();
    let pid: Vec<i64> = rows.iter().map(|c| i64::from(c.pid)).collect();
    let text = |f: fn(&crate::store::containers::ContainerRow) -> &str| -> Vec<&str> {
        rows.iter().map(f).collect()
    };
    let runtime = text(|c| &c.runtime);
    let id = text(|c| &c.container_id);
    let name = text(|c| &c.container_name);
    let image = text(|c| &c.image);
    let digest = text(|c| &c.image_digest);
    let ns = text(|c| &c.pod_namespace);
    let pod = text(|c| &c.pod_name);
    let uid = text(|c| &c.pod_uid);
    let source = text(|c| &c.source);
    tx.execute(
        &format!(
            "INSERT INTO containers_minute (node, {CONTAINER_COLUMNS})
             SELECT $1::TEXT, * FROM UNNEST($2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[],
                 $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::TEXT[], $11::TEXT[], $12::TEXT[])
             ON CONFLICT (node, minute_ms, pid) DO UPDATE SET
                runtime = EXCLUDED.runtime, container_id = EXCLUDED.container_id,
                container_name = EXCLUDED.container_name, image = EXCLUDED.image,
                image_digest = EXCLUDED.image_digest, pod_namespace = EXCLUDED.pod_namespace,
                pod_name = EXCLUDED.pod_name, pod_uid = EXCLUDED.pod_uid, source = EXCLUDED.source"
        ),
        &[
            &r.node, &minute, &pid, &runtime, &id, &name, &image, &digest, &ns, &pod, &uid,
            &source,
        ],
    )
    .await
    .map_err(pg("insert container rows"))?;
    Ok(())
}
