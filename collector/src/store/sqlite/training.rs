//! Training runs: the latest state of each run (upsert per report) and the weight files each
//! wrote; read back newest first.

use super::*;
use crate::store::training::{input_models_json, summary};

/// Upsert every run a report carries, and remember which run wrote each output.
pub(super) fn apply_training(
    tx: &rusqlite::Transaction<'_>,
    r: &IncomingReport,
) -> Result<(), StoreError> {
    let at = r.received_unix_ms;
    for run in &r.telemetry.training {
        exec(
            tx,
            "INSERT INTO training_runs (node, run_id, pid, process, start_ms, last_activity_ms, gpu_seconds,
                 ended, base_models, detail, first_seen_ms, last_seen_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11)
             ON CONFLICT (node, run_id) DO UPDATE SET
                pid = excluded.pid, process = excluded.process,
                start_ms = MIN(start_ms, excluded.start_ms),
                last_activity_ms = MAX(last_activity_ms, excluded.last_activity_ms),
                gpu_seconds = MAX(gpu_seconds, excluded.gpu_seconds),
                ended = MAX(ended, excluded.ended), base_models = excluded.base_models,
                detail = excluded.detail, last_seen_ms = MAX(last_seen_ms, excluded.last_seen_ms)",
            params![
                r.node,
                run.run_id,
                i64::from(run.pid),
                run.process,
                run.start_unix_ms,
                run.last_activity_unix_ms,
                run.gpu_seconds,
                run.ended,
                input_models_json(run),
                prost::Message::encode_to_vec(run),
                at
            ],
        )
        .map_err(sql("upsert training run"))?;
        for o in &run.outputs {
            exec(
                tx,
                "INSERT INTO training_outputs (node, path, run_id) VALUES (?1, ?2, ?3)
                 ON CONFLICT (node, path) DO UPDATE SET run_id = excluded.run_id",
                params![r.node, o.path, run.run_id],
            )
            .map_err(sql("record training output"))?;
        }
    }
    Ok(())
}

pub(super) async fn list_training(
    store: &SqliteStore,
    since_unix_ms: i64,
    limit: u32,
) -> Result<Vec<sov_proto::pb::TrainingRunSummary>, StoreError> {
    let reader = store.reader.clone();
    tokio::task::spawn_blocking(move || {
        reader.with(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT t.node, COALESCE(n.site, ''), COALESCE(n.country, ''), t.detail,
                        t.first_seen_ms, t.last_seen_ms
                 FROM training_runs t LEFT JOIN nodes n ON n.node = t.node
                 WHERE t.last_activity_ms >= ?1 OR t.last_seen_ms >= ?1
                 ORDER BY t.start_ms DESC, t.node, t.run_id
                 LIMIT ?2",
                )
                .map_err(sql("prepare list training"))?;
            let mut rows = stmt
                .query(params![since_unix_ms, i64::from(limit)])
                .map_err(sql("list training"))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(sql("read training row"))? {
                let detail: Vec<u8> = row.get(3).map_err(sql("read training detail"))?;
                out.push(summary(
                    row.get(0).map_err(sql("read training node"))?,
                    row.get(1).map_err(sql("read training site"))?,
                    row.get(2).map_err(sql("read training country"))?,
                    &detail,
                    row.get(4).map_err(sql("read training first seen"))?,
                    row.get(5).map_err(sql("read training last seen"))?,
                ));
            }
            Ok(out)
        })
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}
