//! Training runs: the latest state of each run (upsert per report) and the weight files each
//! wrote; read back newest first.

use super::*;
use crate::store::training::{input_models_json, summary};

const UPSERT_RUN: &str =
    "INSERT INTO training_runs (node, run_id, pid, process, start_ms, last_activity_ms,
         gpu_seconds, ended, base_models, detail, first_seen_ms, last_seen_ms)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11)
     ON CONFLICT (node, run_id) DO UPDATE SET
        pid = EXCLUDED.pid, process = EXCLUDED.process,
        start_ms = LEAST(training_runs.start_ms, EXCLUDED.start_ms),
        last_activity_ms = GREATEST(training_runs.last_activity_ms, EXCLUDED.last_activity_ms),
        gpu_seconds = GREATEST(training_runs.gpu_seconds, EXCLUDED.gpu_seconds),
        ended = training_runs.ended OR EXCLUDED.ended, base_models = EXCLUDED.base_models,
        detail = EXCLUDED.detail,
        last_seen_ms = GREATEST(training_runs.last_seen_ms, EXCLUDED.last_seen_ms)";

const UPSERT_OUTPUT: &str = "INSERT INTO training_outputs (node, path, run_id) VALUES ($1, $2, $3)
     ON CONFLICT (node, path) DO UPDATE SET run_id = EXCLUDED.run_id";

const LIST: &str = "SELECT t.node, COALESCE(n.site, ''), COALESCE(n.country, ''), t.detail,
        t.first_seen_ms, t.last_seen_ms
 FROM training_runs t LEFT JOIN nodes n ON n.node = t.node
 WHERE t.last_activity_ms >= $1 OR t.last_seen_ms >= $1
 ORDER BY t.start_ms DESC, t.node COLLATE \"C\", t.run_id COLLATE \"C\"
 LIMIT $2";

/// Upsert every run a report carries, and remember which run wrote each output.
pub(super) async fn apply_training(tx: &Tx<'_>, r: &IncomingReport) -> Result<(), StoreError> {
    let at = r.received_unix_ms;
    for run in &r.telemetry.training {
        tx.execute(
            UPSERT_RUN,
            &[
                &r.node,
                &run.run_id,
                &i64::from(run.pid),
                &run.process,
                &run.start_unix_ms,
                &run.last_activity_unix_ms,
                &run.gpu_seconds,
                &run.ended,
                &input_models_json(run),
                &prost::Message::encode_to_vec(run),
                &at,
            ],
        )
        .await
        .map_err(pg("upsert training run"))?;
        for o in &run.outputs {
            tx.execute(UPSERT_OUTPUT, &[&r.node, &o.path, &run.run_id])
                .await
                .map_err(pg("record training output"))?;
        }
    }
    Ok(())
}

pub(super) async fn list_training(
    store: &PostgresStore,
    since_unix_ms: i64,
    limit: u32,
) -> Result<Vec<sov_proto::pb::TrainingRunSummary>, StoreError> {
    let client = store.reader().await?;
    let rows = client
        .query(LIST, &[&since_unix_ms, &i64::from(limit)])
        .await
        .map_err(pg("list training"))?;
    let mut out = Vec::new();
    for row in &rows {
        let get = |e| pg(e);
        let detail: Vec<u8> = row.try_get(3).map_err(get("read training detail"))?;
        out.push(summary(
            row.try_get(0).map_err(get("read training node"))?,
            row.try_get(1).map_err(get("read training site"))?,
            row.try_get(2).map_err(get("read training country"))?,
            &detail,
            row.try_get(4).map_err(get("read training first seen"))?,
            row.try_get(5).map_err(get("read training last seen"))?,
        ));
    }
    Ok(out)
}
