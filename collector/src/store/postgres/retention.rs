//! Retention: fold raw samples into minute aggregates, then delete what is past its time,
//! one replica at a time (advisory lock per schema).

use super::*;

/// First key of the advisory lock a pruning transaction tries to take ("rete"), the second
/// being the hash of the schema: one replica of a deployment prunes at a time, the others skip.
pub(super) const RETENTION_LOCK_KEY: i32 = 0x7265_7465;

/// Fold raw rows observed before `$1` into the minute aggregates (merging with rows an earlier
/// pass or a late report already made).
pub(super) const DOWNSAMPLE: [&str; 3] = [
    "INSERT INTO host_minute AS m (node, minute_ms, samples, cpu_percent_avg, cpu_percent_max, load_1_max,
                                   memory_used_avg, memory_used_max, memory_total_bytes)
     SELECT node, observed_ms - (observed_ms % 60000), COUNT(*), AVG(cpu_percent), MAX(cpu_percent),
            MAX(load_1), AVG(memory_used_bytes)::DOUBLE PRECISION, MAX(memory_used_bytes), MAX(memory_total_bytes)
     FROM host_samples WHERE observed_ms < $1 GROUP BY 1, 2
     ON CONFLICT (node, minute_ms) DO UPDATE SET
        cpu_percent_avg = (m.cpu_percent_avg * m.samples + EXCLUDED.cpu_percent_avg * EXCLUDED.samples)
                          / (m.samples + EXCLUDED.samples),
        memory_used_avg = (m.memory_used_avg * m.samples + EXCLUDED.memory_used_avg * EXCLUDED.samples)
                          / (m.samples + EXCLUDED.samples),
        samples = m.samples + EXCLUDED.samples,
        cpu_percent_max = GREATEST(m.cpu_percent_max, EXCLUDED.cpu_percent_max),
        load_1_max = GREATEST(m.load_1_max, EXCLUDED.load_1_max),
        memory_used_max = GREATEST(m.memory_used_max, EXCLUDED.memory_used_max),
        memory_total_bytes = GREATEST(m.memory_total_bytes, EXCLUDED.memory_total_bytes)",
    "INSERT INTO gpu_minute AS m (node, gpu_uuid, minute_ms, samples, utilization_avg, utilization_max,
                                  memory_used_max, memory_total_bytes, power_avg_milliwatts)
     SELECT node, gpu_uuid, observed_ms - (observed_ms % 60000), COUNT(*),
            AVG(utilization_percent)::DOUBLE PRECISION, MAX(utilization_percent), MAX(memory_used_bytes),
            MAX(memory_total_bytes), AVG(power_milliwatts)::DOUBLE PRECISION
     FROM gpu_samples WHERE observed_ms < $1 GROUP BY 1, 2, 3
     ON CONFLICT (node, gpu_uuid, minute_ms) DO UPDATE SET
        utilization_avg = (m.utilization_avg * m.samples + EXCLUDED.utilization_avg * EXCLUDED.samples)
                          / (m.samples + EXCLUDED.samples),
        power_avg_milliwatts = (m.power_avg_milliwatts * m.samples + EXCLUDED.power_avg_milliwatts * EXCLUDED.samples)
                               / (m.samples + EXCLUDED.samples),
        samples = m.samples + EXCLUDED.samples,
        utilization_max = GREATEST(m.utilization_max, EXCLUDED.utilization_max),
        memory_used_max = GREATEST(m.memory_used_max, EXCLUDED.memory_used_max),
        memory_total_bytes = GREATEST(m.memory_total_bytes, EXCLUDED.memory_total_bytes)",
    "INSERT INTO gpu_usage_minute AS m (node, minute_ms, gpu_uuid, pid, process_name, gpu_seconds, used_memory_max)
     SELECT node, observed_ms - (observed_ms % 60000), gpu_uuid, pid, MAX(process_name), SUM(gpu_seconds),
            MAX(used_memory_bytes)
     FROM gpu_usage WHERE observed_ms < $1 GROUP BY 1, 2, 3, 4
     ON CONFLICT (node, minute_ms, gpu_uuid, pid) DO UPDATE SET
        gpu_seconds = m.gpu_seconds + EXCLUDED.gpu_seconds,
        used_memory_max = GREATEST(m.used_memory_max, EXCLUDED.used_memory_max),
        process_name = CASE WHEN EXCLUDED.process_name <> '' THEN EXCLUDED.process_name ELSE m.process_name END",
];

pub(super) async fn prune(
    store: &PostgresStore,
    keep: Retention,
) -> Result<PruneStats, StoreError> {
    let raw = keep.raw_before_unix_ms;
    let aggregates = keep.aggregates_before_unix_ms;
    let mut w = store.writer().await?;
    let tx = w.client.transaction().await.map_err(pg("begin prune"))?;
    let mut stats = PruneStats::default();
    let locked: bool = get(
        &tx.query_one(
            "SELECT pg_try_advisory_xact_lock($1::INT4, hashtext(current_schema()))",
            &[&RETENTION_LOCK_KEY],
        )
        .await
        .map_err(pg("lock retention"))?,
        0,
        "lock retention",
    )?;
    if !locked {
        stats.skipped = true;
        return Ok(stats);
    }
    for step in DOWNSAMPLE {
        stats.downsampled += tx
            .execute(step, &[&raw])
            .await
            .map_err(pg("downsample samples"))?;
    }
    for (table, counter) in [
        ("host_samples", &mut stats.host_samples),
        ("gpu_samples", &mut stats.gpu_samples),
        ("gpu_usage", &mut stats.gpu_usage),
    ] {
        *counter = tx
            .execute(
                &format!("DELETE FROM {table} WHERE observed_ms < $1"),
                &[&raw],
            )
            .await
            .map_err(pg("prune samples"))?;
    }
    let (minutes, hours) = keep.cuts(super::queries::rolled_up_to(&tx).await?);
    for (table, cut) in [
        ("host_minute", aggregates),
        ("gpu_minute", aggregates),
        ("gpu_usage_minute", aggregates),
        ("containers_minute", minutes),
    ] {
        stats.aggregates += tx
            .execute(
                &format!("DELETE FROM {table} WHERE minute_ms < $1"),
                &[&cut],
            )
            .await
            .map_err(pg("prune aggregates"))?;
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
            .execute(&format!("DELETE FROM {table} WHERE {column} < $1"), &[&cut])
            .await
            .map_err(pg("prune hour and day rows"))?;
    }
    stats.flows = tx
        .execute("DELETE FROM flows_minute WHERE minute_ms < $1", &[&minutes])
        .await
        .map_err(pg("prune flows"))?
        + tx.execute("DELETE FROM flows_raw WHERE end_ms < $1", &[&raw])
            .await
            .map_err(pg("prune raw flows"))?
        + tx.execute("DELETE FROM foreign_flows WHERE end_ms < $1", &[&raw])
            .await
            .map_err(pg("prune raw foreign flows"))?;
    // Report keys stay forever (they make re-sends idempotent and prove completeness);
    // only their bodies go.
    stats.report_bodies = tx
        .execute(
            "UPDATE reports SET body = ''::BYTEA WHERE received_ms < $1 AND octet_length(body) > 0",
            &[&raw],
        )
        .await
        .map_err(pg("prune report bodies"))?;
    tx.commit().await.map_err(pg("commit prune"))?;
    Ok(stats)
}

/// One hour per transaction under the rollup lock (exclusive: deriving transactions with late
/// rows take it shared), on the writer connection.
pub(super) async fn roll_up(
    store: &PostgresStore,
    before: i64,
) -> Result<crate::store::RollupStats, StoreError> {
    use crate::store::rollup;
    let target = rollup::minute_target(before);
    let mut stats = crate::store::RollupStats::default();
    loop {
        let mut w = store.writer().await?;
        let tx = w.client.transaction().await.map_err(pg("begin rollup"))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&rollup::ROLLUP_LOCK_KEY],
        )
        .await
        .map_err(pg("lock rollup"))?;
        let up_to: i64 = get(
            &tx.query_one(
                "SELECT up_to_ms FROM rollup_state WHERE name = 'hourly'",
                &[],
            )
            .await
            .map_err(pg("read rollup state"))?,
            0,
            "read rollup state",
        )?;
        stats.up_to_unix_ms = up_to;
        let next: Option<i64> = get(
            &tx.query_one(rollup::NEXT_ROW, &[&up_to])
                .await
                .map_err(pg("find next rollup row"))?,
            0,
            "find next rollup row",
        )?;
        let Some((start, end)) = rollup::next_hour(up_to, next, target) else {
            if target > up_to {
                tx.execute(
                    "UPDATE rollup_state SET up_to_ms = $1 WHERE name = 'hourly'",
                    &[&target],
                )
                .await
                .map_err(pg("advance rollup state"))?;
                stats.up_to_unix_ms = target;
            }
            tx.commit().await.map_err(pg("commit rollup"))?;
            break;
        };
        stats.flow_rows += tx
            .execute(rollup::ROLL_FLOWS.as_str(), &[&start, &end])
            .await
            .map_err(pg("roll up flows"))?;
        stats.gpu_rows += tx
            .execute(rollup::ROLL_GPU, &[&start, &end])
            .await
            .map_err(pg("roll up gpu usage"))?;
        stats.contested_rows += tx
            .execute(rollup::ROLL_CONTESTED.as_str(), &[&start, &end])
            .await
            .map_err(pg("roll up contested flows"))?;
        tx.execute(
            "UPDATE rollup_state SET up_to_ms = $1 WHERE name = 'hourly'",
            &[&end],
        )
        .await
        .map_err(pg("advance rollup state"))?;
        tx.commit().await.map_err(pg("commit rollup"))?;
        stats.hours += 1;
        stats.up_to_unix_ms = end;
    }
    // Then whole days of hour rows, up to the day the rolled-up hours reach, under the same
    // lock (the late-row triggers carry hour rows into day rows holding it shared).
    loop {
        let mut w = store.writer().await?;
        let tx = w
            .client
            .transaction()
            .await
            .map_err(pg("begin daily rollup"))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&rollup::ROLLUP_LOCK_KEY],
        )
        .await
        .map_err(pg("lock rollup"))?;
        let mut hours = 0i64;
        let mut up_to = 0i64;
        for row in tx
            .query("SELECT name, up_to_ms FROM rollup_state", &[])
            .await
            .map_err(pg("read rollup state"))?
        {
            let name: String = get(&row, 0, "read rollup state")?;
            let at: i64 = get(&row, 1, "read rollup state")?;
            match name.as_str() {
                "hourly" => hours = at,
                "daily" => up_to = at,
                _ => {}
            }
        }
        stats.days_up_to_unix_ms = up_to;
        let target = rollup::day_target(hours);
        let next: Option<i64> = get(
            &tx.query_one(rollup::NEXT_HOUR_ROW, &[&up_to])
                .await
                .map_err(pg("find next daily rollup row"))?,
            0,
            "find next daily rollup row",
        )?;
        let Some((start, end)) = rollup::next_day(up_to, next, target) else {
            if target > up_to {
                tx.execute(
                    "UPDATE rollup_state SET up_to_ms = $1 WHERE name = 'daily'",
                    &[&target],
                )
                .await
                .map_err(pg("advance daily rollup state"))?;
                stats.days_up_to_unix_ms = target;
            }
            tx.commit().await.map_err(pg("commit daily rollup"))?;
            return Ok(stats);
        };
        for text in [
            rollup::ROLL_FLOWS_DAY.as_str(),
            rollup::ROLL_GPU_DAY,
            rollup::ROLL_FLOWS_REST.as_str(),
            rollup::ROLL_FLEET_REST.as_str(),
        ] {
            stats.day_rows += tx
                .execute(text, &[&start, &end])
                .await
                .map_err(pg("roll up days"))?;
        }
        stats.contested_rows += tx
            .execute(rollup::ROLL_CONTESTED_DAY.as_str(), &[&start, &end])
            .await
            .map_err(pg("roll up contested days"))?;
        tx.execute(
            "UPDATE rollup_state SET up_to_ms = $1 WHERE name = 'daily'",
            &[&end],
        )
        .await
        .map_err(pg("advance daily rollup state"))?;
        tx.commit().await.map_err(pg("commit daily rollup"))?;
        stats.days += 1;
        stats.days_up_to_unix_ms = end;
    }
}
