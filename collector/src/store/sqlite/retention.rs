//! Retention: fold raw samples into minute aggregates, then delete what is past its time.

use super::*;

/// Fold raw rows observed before `?1` into the minute aggregates (merging with rows an earlier
/// pass or a late report already made).
pub(super) const DOWNSAMPLE: [&str; 3] = [
    "INSERT INTO host_minute (node, minute_ms, samples, cpu_percent_avg, cpu_percent_max, load_1_max,
                              memory_used_avg, memory_used_max, memory_total_bytes)
     SELECT node, observed_ms - (observed_ms % 60000), COUNT(*), AVG(cpu_percent), MAX(cpu_percent),
            MAX(load_1), AVG(memory_used_bytes), MAX(memory_used_bytes), MAX(memory_total_bytes)
     FROM host_samples WHERE observed_ms < ?1 GROUP BY 1, 2
     ON CONFLICT (node, minute_ms) DO UPDATE SET
        cpu_percent_avg = (cpu_percent_avg * samples + excluded.cpu_percent_avg * excluded.samples)
                          / (samples + excluded.samples),
        memory_used_avg = (memory_used_avg * samples + excluded.memory_used_avg * excluded.samples)
                          / (samples + excluded.samples),
        samples = samples + excluded.samples,
        cpu_percent_max = max(cpu_percent_max, excluded.cpu_percent_max),
        load_1_max = max(load_1_max, excluded.load_1_max),
        memory_used_max = max(memory_used_max, excluded.memory_used_max),
        memory_total_bytes = max(memory_total_bytes, excluded.memory_total_bytes)",
    "INSERT INTO gpu_minute (node, gpu_uuid, minute_ms, samples, utilization_avg, utilization_max,
                             memory_used_max, memory_total_bytes, power_avg_milliwatts)
     SELECT node, gpu_uuid, observed_ms - (observed_ms % 60000), COUNT(*), AVG(utilization_percent),
            MAX(utilization_percent), MAX(memory_used_bytes), MAX(memory_total_bytes), AVG(power_milliwatts)
     FROM gpu_samples WHERE observed_ms < ?1 GROUP BY 1, 2, 3
     ON CONFLICT (node, gpu_uuid, minute_ms) DO UPDATE SET
        utilization_avg = (utilization_avg * samples + excluded.utilization_avg * excluded.samples)
                          / (samples + excluded.samples),
        power_avg_milliwatts = (power_avg_milliwatts * samples + excluded.power_avg_milliwatts * excluded.samples)
                               / (samples + excluded.samples),
        samples = samples + excluded.samples,
        utilization_max = max(utilization_max, excluded.utilization_max),
        memory_used_max = max(memory_used_max, excluded.memory_used_max),
        memory_total_bytes = max(memory_total_bytes, excluded.memory_total_bytes)",
    "INSERT INTO gpu_usage_minute (node, minute_ms, gpu_uuid, pid, process_name, gpu_seconds, used_memory_max)
     SELECT node, observed_ms - (observed_ms % 60000), gpu_uuid, pid, MAX(process_name), SUM(gpu_seconds),
            MAX(used_memory_bytes)
     FROM gpu_usage WHERE observed_ms < ?1 GROUP BY 1, 2, 3, 4
     ON CONFLICT (node, minute_ms, gpu_uuid, pid) DO UPDATE SET
        gpu_seconds = gpu_seconds + excluded.gpu_seconds,
        used_memory_max = max(used_memory_max, excluded.used_memory_max),
        process_name = CASE WHEN excluded.process_name <> '' THEN excluded.process_name ELSE process_name END",
];

impl SqliteStore {
    pub(super) fn prune_blocking(
        conn: &mut Connection,
        keep: Retention,
    ) -> Result<PruneStats, StoreError> {
        let raw = keep.raw_before_unix_ms;
        let aggregates = keep.aggregates_before_unix_ms;
        let tx = conn.transaction().map_err(sql("begin prune"))?;
        let mut stats = PruneStats::default();
        for step in DOWNSAMPLE {
            stats.downsampled += tx.execute(step, [raw]).map_err(sql("downsample samples"))? as u64;
        }
        for (table, counter) in [
            ("host_samples", &mut stats.host_samples),
            ("gpu_samples", &mut stats.gpu_samples),
            ("gpu_usage", &mut stats.gpu_usage),
        ] {
            *counter = tx
                .execute(
                    &format!("DELETE FROM {table} WHERE observed_ms < ?1"),
                    [raw],
                )
                .map_err(sql("prune samples"))? as u64;
        }
        let (minutes, hours) = keep.cuts(super::queries::rolled_up_to(&tx)?);
        for (table, cut) in [
            ("host_minute", aggregates),
            ("gpu_minute", aggregates),
            ("gpu_usage_minute", aggregates),
            ("containers_minute", minutes),
        ] {
            stats.aggregates += tx
                .execute(&format!("DELETE FROM {table} WHERE minute_ms < ?1"), [cut])
                .map_err(sql("prune aggregates"))? as u64;
        }
        for (table, column, cut) in [
            ("flows_hour", "hour_ms", hours),
            ("gpu_usage_hour", "hour_ms", hours),
            ("flows_day", "day_ms", aggregates),
            ("gpu_usage_day", "day_ms", aggregates),
            ("fleet_hour", "hour_ms", hours),
            ("flows_rest", "from_ms", hours),
            ("fleet_rest", "from_ms", hours),
            ("fleet_day", "day_ms", aggregates),
            ("contested_hour", "hour_ms", hours),
            ("contested_day", "day_ms", aggregates),
        ] {
            stats.aggregates += tx
                .execute(&format!("DELETE FROM {table} WHERE {column} < ?1"), [cut])
                .map_err(sql("prune hour and day rows"))? as u64;
        }
        stats.flows = tx
            .execute("DELETE FROM flows_minute WHERE minute_ms < ?1", [minutes])
            .map_err(sql("prune flows"))? as u64
            + tx.execute("DELETE FROM flows_raw WHERE end_ms < ?1", [raw])
                .map_err(sql("prune raw flows"))? as u64
            + tx.execute("DELETE FROM foreign_flows WHERE end_ms < ?1", [raw])
                .map_err(sql("prune raw foreign flows"))? as u64;
        // Report keys stay forever (they make re-sends idempotent and prove completeness);
        // only their bodies go.
        stats.report_bodies = tx
            .execute(
                "UPDATE reports SET body = x'' WHERE received_ms < ?1 AND length(body) > 0",
                [raw],
            )
            .map_err(sql("prune report bodies"))? as u64;
        tx.commit().map_err(sql("commit prune"))?;
        Ok(stats)
    }
}

pub(super) async fn prune(
    store: &SqliteStore,
    retention: Retention,
) -> Result<PruneStats, StoreError> {
    let writer = store.writer.clone();
    tokio::task::spawn_blocking(move || SqliteStore::prune_blocking(&mut lock(&writer), retention))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

impl SqliteStore {
    /// One hour per transaction, each on the writer (so no derive runs in between).
    pub(super) fn roll_up_blocking(
        conn: &mut Connection,
        before: i64,
    ) -> Result<crate::store::RollupStats, StoreError> {
        use crate::store::rollup;
        let target = rollup::minute_target(before);
        let mut stats = crate::store::RollupStats::default();
        loop {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql("begin rollup"))?;
            let up_to: i64 = tx
                .query_row(
                    "SELECT up_to_ms FROM rollup_state WHERE name = 'hourly'",
                    [],
                    |r| r.get(0),
                )
                .map_err(sql("read rollup state"))?;
            stats.up_to_unix_ms = up_to;
            let next: Option<i64> = tx
                .query_row(rollup::NEXT_ROW, [up_to], |r| r.get(0))
                .map_err(sql("find next rollup row"))?;
            let Some((start, end)) = rollup::next_hour(up_to, next, target) else {
                if target > up_to {
                    tx.execute(
                        "UPDATE rollup_state SET up_to_ms = ?1 WHERE name = 'hourly'",
                        [target],
                    )
                    .map_err(sql("advance rollup state"))?;
                    stats.up_to_unix_ms = target;
                }
                tx.commit().map_err(sql("commit rollup"))?;
                break;
            };
            stats.flow_rows += tx
                .execute(rollup::ROLL_FLOWS.as_str(), [start, end])
                .map_err(sql("roll up flows"))? as u64;
            stats.gpu_rows += tx
                .execute(rollup::ROLL_GPU, [start, end])
                .map_err(sql("roll up gpu usage"))? as u64;
            stats.contested_rows +=
                tx.execute(rollup::ROLL_CONTESTED.as_str(), [start, end])
                    .map_err(sql("roll up contested flows"))? as u64;
            tx.execute(
                "UPDATE rollup_state SET up_to_ms = ?1 WHERE name = 'hourly'",
                [end],
            )
            .map_err(sql("advance rollup state"))?;
            tx.commit().map_err(sql("commit rollup"))?;
            stats.hours += 1;
            stats.up_to_unix_ms = end;
        }
        // Then whole days of hour rows, up to the day the rolled-up hours reach.
        loop {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql("begin daily rollup"))?;
            let read = |name: &str| {
                tx.query_row(
                    "SELECT up_to_ms FROM rollup_state WHERE name = ?1",
                    [name],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(sql("read rollup state"))
            };
            let (hours, up_to) = (read("hourly")?, read("daily")?);
            stats.days_up_to_unix_ms = up_to;
            let target = rollup::day_target(hours);
            let next: Option<i64> = tx
                .query_row(rollup::NEXT_HOUR_ROW, [up_to], |r| r.get(0))
                .map_err(sql("find next daily rollup row"))?;
            let Some((start, end)) = rollup::next_day(up_to, next, target) else {
                if target > up_to {
                    tx.execute(
                        "UPDATE rollup_state SET up_to_ms = ?1 WHERE name = 'daily'",
                        [target],
                    )
                    .map_err(sql("advance daily rollup state"))?;
                    stats.days_up_to_unix_ms = target;
                }
                tx.commit().map_err(sql("commit daily rollup"))?;
                return Ok(stats);
            };
            for text in [
                rollup::ROLL_FLOWS_DAY.as_str(),
                rollup::ROLL_GPU_DAY,
                rollup::ROLL_FLOWS_REST.as_str(),
                rollup::ROLL_FLEET_REST.as_str(),
            ] {
                stats.day_rows += tx
                    .execute(text, [start, end])
                    .map_err(sql("roll up days"))? as u64;
            }
            stats.contested_rows += tx
                .execute(rollup::ROLL_CONTESTED_DAY.as_str(), [start, end])
                .map_err(sql("roll up contested days"))? as u64;
            tx.execute(
                "UPDATE rollup_state SET up_to_ms = ?1 WHERE name = 'daily'",
                [end],
            )
            .map_err(sql("advance daily rollup state"))?;
            tx.commit().map_err(sql("commit daily rollup"))?;
            stats.days += 1;
            stats.days_up_to_unix_ms = end;
        }
    }
}

pub(super) async fn roll_up(
    store: &SqliteStore,
    before_unix_ms: i64,
) -> Result<crate::store::RollupStats, StoreError> {
    store
        .write(move |c| SqliteStore::roll_up_blocking(c, before_unix_ms))
        .await
}
