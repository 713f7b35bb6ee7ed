//! Storing reports: group commit of queued reports, one transaction per batch (or per report
//! when a batch fails), and every row a report makes (node facts, telemetry, flows, weights,
//! the address it came from).

use super::*;

/// One deriver reads the whole queue.
pub(super) const DERIVES_A_SHARE: bool = false;

/// The report's time series rows, and the node's latest GPU columns when this report is the
/// node's newest.
pub(super) fn insert_telemetry(
    tx: &rusqlite::Transaction<'_>,
    r: &IncomingReport,
    _epoch: i64,
) -> Result<(), StoreError> {
    let t = &r.telemetry;
    let at = r.observed_unix_ms;
    if let Some(h) = &t.host {
        exec(tx,
            "INSERT OR REPLACE INTO host_samples (node, observed_ms, cpu_percent, load_1, memory_used_bytes,
                                                  memory_total_bytes, swap_used_bytes, process_count)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                r.node,
                at,
                f64::from(h.cpu_percent),
                h.load_1,
                to_i64(h.memory_used_bytes, "memory_used_bytes")?,
                to_i64(h.memory_total_bytes, "memory_total_bytes")?,
                to_i64(h.swap_used_bytes, "swap_used_bytes")?,
                h.process_count
            ],
        )
        .map_err(sql("insert host sample"))?;
    }
    let names: std::collections::HashMap<u32, &sov_proto::pb::ProcessInfo> =
        t.processes.iter().map(|p| (p.pid, p)).collect();
    for g in &t.gpus {
        let uuid = if g.uuid.is_empty() {
            format!("index-{}", g.index)
        } else {
            g.uuid.clone()
        };
        exec(tx,
            "INSERT OR REPLACE INTO gpu_samples (node, gpu_uuid, observed_ms, gpu_index, name, utilization_percent,
                 memory_util_percent, memory_used_bytes, memory_total_bytes, power_milliwatts, temperature_celsius, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                r.node,
                uuid,
                at,
                g.index,
                g.name,
                g.utilization_gpu_percent,
                g.utilization_memory_percent,
                to_i64(g.memory_used_bytes, "gpu memory_used_bytes")?,
                to_i64(g.memory_total_bytes, "gpu memory_total_bytes")?,
                g.power_draw_milliwatts,
                g.temperature_celsius,
                g.error
            ],
        )
        .map_err(sql("insert gpu sample"))?;
        for p in &g.processes {
            let info = names.get(&p.pid);
            exec(tx,
                "INSERT OR REPLACE INTO gpu_usage (node, observed_ms, gpu_uuid, pid, process_name, exe, container_id,
                                                   gpu_seconds, used_memory_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    r.node,
                    at,
                    uuid,
                    p.pid,
                    info.map(|i| i.name.as_str()).unwrap_or(""),
                    info.map(|i| i.exe.as_str()).unwrap_or(""),
                    info.map(|i| i.container_id.as_str()).unwrap_or(""),
                    p.gpu_seconds,
                    to_i64(p.used_memory_bytes, "gpu process memory")?
                ],
            )
            .map_err(sql("insert gpu usage"))?;
        }
    }
    let GpuSummary {
        state: gpu_state,
        count,
        util,
        mem_used,
        mem_total,
    } = GpuSummary::of(t);
    exec(
        tx,
        "UPDATE nodes SET gpu_state = ?2, gpu_count = ?3, gpu_util_percent = ?4,
                          gpu_memory_used_bytes = ?5, gpu_memory_total_bytes = ?6
         WHERE node = ?1 AND last_observed_ms = ?7",
        params![
            r.node,
            gpu_state,
            i64::try_from(count).unwrap_or(i64::MAX),
            util,
            to_i64(mem_used, "gpu memory used")?,
            to_i64(mem_total, "gpu memory total")?,
            at
        ],
    )
    .map_err(sql("update node gpus"))?;
    Ok(())
}

/// Write a batch's merged flow aggregates ([`crate::store::minutes`]): one upsert per row.
/// Rows of minutes already rolled up into hours (late) also change their hour rows, once per
/// hour row for the whole batch ([`crate::store::minutes::HourChanges`]); the others are plain
/// upserts, with no trigger.
pub(super) fn write_minutes(
    tx: &rusqlite::Transaction<'_>,
    sums: &std::collections::BTreeMap<
        crate::store::minutes::MinuteKey<'_>,
        crate::store::minutes::MinuteSums<'_>,
    >,
) -> Result<(), StoreError> {
    use crate::store::minutes as m;
    if sums.is_empty() {
        return Ok(());
    }
    let up_to: i64 = tx
        .prepare_cached("SELECT up_to_ms FROM rollup_state WHERE name = 'hourly'")
        .and_then(|mut st| st.query_row([], |r| r.get(0)).optional())
        .map_err(sql("read rollup state"))?
        .unwrap_or(0);
    let (fresh, late) = m::split_late(sums, up_to);
    let upsert = format!(
        "INSERT INTO flows_minute (node, minute_ms, pid, process, protocol, direction, remote_address, remote_port,
                                   country, asn, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us,
                                   {})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                 ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24)
         ON CONFLICT (node, minute_ms, pid, protocol, direction, remote_address, remote_port) DO UPDATE SET
            bytes_sent = bytes_sent + excluded.bytes_sent,
            bytes_received = bytes_received + excluded.bytes_received,
            connections = connections + excluded.connections,
            min_rtt_us = CASE WHEN min_rtt_us = 0 THEN excluded.min_rtt_us
                              WHEN excluded.min_rtt_us = 0 THEN min_rtt_us
                              ELSE min(min_rtt_us, excluded.min_rtt_us) END,
            process = CASE WHEN excluded.process <> '' THEN excluded.process ELSE process END,
            {}",
        crate::store::VERDICT_COLUMNS,
        crate::store::VERDICT_UPSERT
    );
    if !fresh.is_empty() {
        // Prepared once for the batch (the cache would hash the statement's text for every row).
        let mut st = tx
            .prepare_cached(&upsert)
            .map_err(sql("prepare aggregate flow"))?;
        for ((node, minute, pid, protocol, direction, remote, port), e) in fresh {
            let key = (*node, *minute, *pid, *protocol, *direction, *remote, *port);
            with_minute_row(&key, e, |p| st.execute(p)).map_err(sql("aggregate flow"))?;
        }
    }
    if late.is_empty() {
        return Ok(());
    }
    m::count_late(late.len());
    // A late row read as its hour row's key and sums, then its destination (for the contested
    // level).
    let read = |r: &rusqlite::Row<'_>| {
        let (k, s) = m::hour_row(|i| r.get::<_, String>(i), |i| r.get::<_, i64>(i))?;
        Ok((k, s, r.get::<_, String>(21)?, r.get::<_, i64>(22)?))
    };
    let late_row = format!("{}, remote_address, remote_port", m::MINUTE_AS_HOUR);
    let mut stored = tx
        .prepare_cached(&format!(
            "SELECT {late_row} FROM flows_minute
             WHERE node = ?1 AND minute_ms = ?2 AND pid = ?3 AND protocol = ?4 AND direction = ?5
               AND remote_address = ?6 AND remote_port = ?7"
        ))
        .map_err(sql("prepare late flow"))?;
    let mut merged = tx
        .prepare_cached(&format!("{upsert} RETURNING {late_row}"))
        .map_err(sql("prepare late flow"))?;
    // The daily rollup's point, read when a late contested row needs it.
    let mut days_up_to: Option<i64> = None;
    let mut day_rolled = |minute: i64| -> Result<bool, StoreError> {
        let up_to = match days_up_to {
            Some(v) => v,
            None => {
                let v: i64 = tx
                    .prepare_cached("SELECT up_to_ms FROM rollup_state WHERE name = 'daily'")
                    .and_then(|mut st| st.query_row([], |r| r.get(0)).optional())
                    .map_err(sql("read rollup state"))?
                    .unwrap_or(0);
                days_up_to = Some(v);
                v
            }
        };
        Ok(minute < up_to)
    };
    let mut hours = m::HourChanges::default();
    let (mut contested_hours, mut contested_days) = (
        m::ContestedChanges::default(),
        m::ContestedChanges::default(),
    );
    // The contested level's rows of a late row: its hour's, and its day's when that day is
    // rolled up (`minute` is the row's own, so both are decided by it).
    let mut contested_keys =
        |minute: i64, k: &m::HourKey, address: &str, port: i64| -> Result<_, StoreError> {
            let hour = m::ContestedKey {
                rolled: k.clone(),
                remote_address: address.to_owned(),
                remote_port: port,
            };
            let day = if day_rolled(minute)? {
                let mut day = hour.clone();
                day.rolled.hour_ms = minute - minute % 86_400_000;
                Some(day)
            } else {
                None
            };
            Ok((hour, day))
        };
    for ((node, minute, pid, protocol, direction, remote, port), e) in late {
        let before = stored
            .query_row(
                params![node, minute, pid, protocol, direction, remote, port],
                read,
            )
            .optional()
            .map_err(sql("late flow: stored row"))?;
        if let Some((k, s, address, port)) = before {
            if k.contested != 0 {
                let (hour, day) = contested_keys(*minute, &k, &address, port)?;
                contested_hours.leave(hour, &s);
                if let Some(day) = day {
                    contested_days.leave(day, &s);
                }
            }
            hours.leave(k, &s);
        }
        let key = (*node, *minute, *pid, *protocol, *direction, *remote, *port);
        let (k, s, address, port) =
            with_minute_row(&key, e, |p| merged.query_row(p, read)).map_err(sql("late flow"))?;
        if k.contested != 0 {
            let (hour, day) = contested_keys(*minute, &k, &address, port)?;
            if let Some(day) = day {
                contested_days.join(day, s.clone());
            }
            contested_hours.join(hour, s.clone());
        }
        hours.join(k, s);
    }
    let hour_rows = hours.into_rows().map(|(k, joined, s)| (k, joined, s, None));
    write_late_rows(tx, "flows_hour", "hour_ms", hour_rows)?;
    for (table, level, changes) in [
        ("contested_hour", "hour_ms", contested_hours),
        ("contested_day", "day_ms", contested_days),
    ] {
        if !changes.is_empty() {
            let rows = changes.into_rows().map(|(k, joined, s)| {
                let extra = (k.remote_address, k.remote_port);
                (k.rolled, joined, s, Some(extra))
            });
            write_late_rows(tx, table, level, rows)?;
        }
    }
    Ok(())
}

/// Write the rolled-up rows a batch's late minute rows changed in `table` (at `level`, the
/// table's hour or day column), once each: an upsert where a merged row joined the row, an
/// update of the additive sums where rows only left it. A row's key may carry a destination
/// (the contested level: `(remote_address, remote_port)` after the hour row's key columns).
fn write_late_rows(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    level: &str,
    rows: impl Iterator<
        Item = (
            crate::store::minutes::HourKey,
            bool,
            crate::store::minutes::HourSums,
            Option<(String, i64)>,
        ),
    >,
) -> Result<(), StoreError> {
    use crate::store::minutes as m;
    let mut rows = rows.peekable();
    let Some(first) = rows.peek() else {
        return Ok(());
    };
    let with_destination = first.3.is_some();
    // The key columns (1..=11, then the destination as 22 and 23), the others 12..=21 in
    // [`m::HOUR_COLUMNS`]' order.
    let (destination_columns, destination_values, destination_key) = if with_destination {
        (
            ", remote_address, remote_port",
            ", ?22, ?23",
            " AND remote_address = ?22 AND remote_port = ?23",
        )
    } else {
        ("", "", "")
    };
    let columns = m::HOUR_COLUMNS.replacen("hour_ms", level, 1);
    let mut joined = tx
        .prepare_cached(&format!(
            "INSERT INTO {table} ({columns}{destination_columns})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21{destination_values})
             ON CONFLICT DO UPDATE SET {}",
            m::LATE_HOUR_SUMS_IN.replace("flows_hour.", &format!("{table}."))
        ))
        .map_err(sql("prepare late rolled row"))?;
    let mut left = tx
        .prepare_cached(&format!(
            "UPDATE {table} SET bytes_sent = bytes_sent + ?14, bytes_received = bytes_received + ?15,
                    connections = connections + ?16, conntrack_bytes = conntrack_bytes + ?20,
                    unmeasured_flows = unmeasured_flows + ?21
             WHERE {level} = ?2 AND node = ?1 AND pid = ?3 AND process = ?4 AND direction = ?5
               AND country = ?6 AND asn = ?7 AND answers = ?8 AND contested = ?9
               AND operator_country = ?10 AND physics = ?11{destination_key}"
        ))
        .map_err(sql("prepare late rolled row"))?;
    for (k, is_joined, s, destination) in rows {
        let (address, port) = destination.unwrap_or_default();
        let mut p: Vec<&dyn rusqlite::ToSql> = vec![
            &k.node,
            &k.hour_ms,
            &k.pid,
            &k.process,
            &k.direction,
            &k.country,
            &k.asn,
            &k.answers,
            &k.contested,
            &k.operator_country,
            &k.physics,
            &s.org,
            &s.geo_source,
            &s.bytes_sent,
            &s.bytes_received,
            &s.connections,
            &s.min_rtt_us,
            &s.distance_km,
            &s.limit_km,
            &s.conntrack_bytes,
            &s.unmeasured_flows,
        ];
        if with_destination {
            p.push(&address);
            p.push(&port);
        }
        if is_joined {
            joined
                .execute(p.as_slice())
                .map_err(sql("late flows: their rolled-up row"))?;
        } else {
            left.execute(p.as_slice())
                .map_err(sql("late flows: out of their rolled-up row"))?;
        }
    }
    Ok(())
}

/// Run `f` with the parameters of `flows_minute`'s upsert for one merged row.
fn with_minute_row<T>(
    (node, minute, pid, protocol, direction, remote, port): &crate::store::minutes::MinuteKey<'_>,
    e: &crate::store::minutes::MinuteSums<'_>,
    f: impl FnOnce(&[&dyn rusqlite::ToSql]) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let none = crate::store::VerdictColumns::default();
    let v = e.verdict.unwrap_or(&none);
    f(params![
        node,
        minute,
        pid,
        e.process,
        protocol,
        direction,
        remote,
        port,
        e.country,
        e.asn,
        e.org,
        e.geo_source,
        e.bytes_sent,
        e.bytes_received,
        e.connections,
        e.min_rtt_us,
        v.answers_json,
        i64::from(e.contested),
        e.operator_country,
        v.physics,
        v.distance_km,
        v.limit_km,
        e.conntrack_bytes,
        e.unmeasured_flows
    ])
}

/// Keep the report's flows to destinations outside the node's declared country raw, as one
/// row ([`crate::store::minutes::foreign_flows`]; the policy refines "outside" with the
/// jurisdiction's inside countries).
pub(super) fn keep_raw_flows(
    tx: &rusqlite::Transaction<'_>,
    r: &IncomingReport,
    epoch: i64,
    seq: i64,
    raw: Option<&crate::store::minutes::ForeignFlows>,
) -> Result<(), StoreError> {
    let Some(f) = raw else {
        return Ok(());
    };
    exec(tx,
        "INSERT OR IGNORE INTO foreign_flows (node, epoch, seq, start_ms, end_ms, flow_count, countries, flows)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![r.node, epoch, seq, f.start_ms, f.end_ms, f.flow_count, f.countries, f.flows],
    )
    .map_err(sql("keep raw flows"))?;
    Ok(())
}

/// Apply a report's weight inventory: upsert what it carries, mark what went away.
pub(super) fn apply_weights(
    tx: &rusqlite::Transaction<'_>,
    r: &IncomingReport,
) -> Result<(), StoreError> {
    let w = &r.telemetry.weights;
    if w.is_empty() {
        return Ok(());
    }
    let at = r.received_unix_ms;
    for f in &w.files {
        let id = f.identity.clone().unwrap_or_default();
        let st = f.storage.clone().unwrap_or_default();
        exec(tx,
            "INSERT INTO weight_files (node, path, format, size_bytes, mtime_ms, device, inode, sha256, model, revision,
                 repo_path, identity_source, publisher, parameter_count, mount_point, fs_type, network, server_address,
                 users, detail, first_seen_ms, last_seen_ms, removed_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?21, NULL)
             ON CONFLICT (node, path) DO UPDATE SET
                format = excluded.format, size_bytes = excluded.size_bytes, mtime_ms = excluded.mtime_ms,
                device = excluded.device, inode = excluded.inode,
                sha256 = CASE WHEN excluded.sha256 = '' AND size_bytes = excluded.size_bytes AND mtime_ms = excluded.mtime_ms
                              THEN sha256 ELSE excluded.sha256 END,
                model = excluded.model, revision = excluded.revision, repo_path = excluded.repo_path,
                identity_source = excluded.identity_source, publisher = excluded.publisher,
                parameter_count = excluded.parameter_count, mount_point = excluded.mount_point,
                fs_type = excluded.fs_type, network = excluded.network, server_address = excluded.server_address,
                users = excluded.users, detail = excluded.detail, last_seen_ms = excluded.last_seen_ms,
                first_seen_ms = CASE WHEN removed_ms IS NULL THEN first_seen_ms ELSE excluded.first_seen_ms END,
                removed_ms = NULL",
            params![
                r.node,
                f.path,
                format_name(f.format),
                to_i64(f.size_bytes, "weight size")?,
                f.mtime_unix_ms,
                f.device as i64,
                f.inode as i64,
                f.sha256,
                id.model,
                id.revision,
                id.repo_path,
                id.source,
                id.publisher,
                to_i64(f.parameter_count, "parameter_count")?,
                st.mount_point,
                st.fs_type,
                st.network,
                st.server_address,
                crate::store::users_json(f),
                prost::Message::encode_to_vec(f),
                at
            ],
        )
        .map_err(sql("upsert weight file"))?;
    }
    for path in &w.removed {
        exec(tx,
            "UPDATE weight_files SET removed_ms = ?3 WHERE node = ?1 AND path = ?2 AND removed_ms IS NULL",
            params![r.node, path, at],
        )
        .map_err(sql("mark weight file removed"))?;
    }
    if let Some(chunk) = &w.chunk {
        // A generation (one chunk or several) removes what none of its chunks names, the
        // paths it withheld included.
        apply_generation(tx, r, chunk)?;
    } else if w.full && !w.withheld_unnamed {
        exec(tx,
            "UPDATE weight_files SET removed_ms = ?2 WHERE node = ?1 AND removed_ms IS NULL AND last_seen_ms < ?2",
            params![r.node, at],
        )
        .map_err(sql("mark unlisted weight files removed"))?;
        // What the report withheld is still there.
        for path in &w.withheld_paths {
            exec(tx,
                "UPDATE weight_files SET removed_ms = NULL WHERE node = ?1 AND path = ?2 AND removed_ms = ?3",
                params![r.node, path, at],
            )
            .map_err(sql("keep withheld weight files"))?;
        }
    }
    Ok(())
}

/// One chunk of a full inventory ([`crate::store::generations`]).
fn apply_generation(
    tx: &rusqlite::Transaction<'_>,
    r: &IncomingReport,
    chunk: &sov_proto::pb::InventoryChunk,
) -> Result<(), StoreError> {
    use crate::store::generations as g;
    let w = &r.telemetry.weights;
    let at = r.received_unix_ms;
    let node = &r.node;
    let epoch = to_i64(r.epoch, "epoch")?;
    let generation = to_i64(chunk.generation, "weight_inventory.generation")?;
    let applied: Option<(i64, i64)> = tx
        .query_row(g::APPLIED, [node], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .map_err(sql("read applied inventory generation"))?;
    if applied.is_some_and(|a| a >= (epoch, generation)) {
        return Ok(());
    }
    let count = chunk.last.then(|| i64::from(chunk.index) + 1);
    exec(
        tx,
        g::NOTE_GENERATION,
        params![
            node,
            epoch,
            generation,
            count,
            i64::from(w.withheld_unnamed),
            at
        ],
    )
    .map_err(sql("note inventory generation"))?;
    exec(
        tx,
        g::NOTE_CHUNK,
        params![node, epoch, generation, i64::from(chunk.index)],
    )
    .map_err(sql("note inventory chunk"))?;
    for path in w.files.iter().map(|f| &f.path).chain(&w.withheld_paths) {
        exec(tx, g::NOTE_PATH, params![node, epoch, generation, path])
            .map_err(sql("note inventory path"))?;
    }
    let (count, held, unnamed, started): (Option<i64>, i64, i64, i64) = tx
        .query_row(g::STATE, params![node, epoch, generation], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .map_err(sql("read inventory generation"))?;
    let (forget_epoch, forget_generation) = if count == Some(held) {
        if unnamed == 0 {
            exec(
                tx,
                g::REMOVE_UNNAMED_BY_GENERATION,
                params![at, node, started, epoch, generation],
            )
            .map_err(sql("mark files outside the inventory removed"))?;
        }
        exec(tx, g::SET_APPLIED, params![node, epoch, generation])
            .map_err(sql("note applied inventory generation"))?;
        (epoch, generation)
    } else {
        (-1, -1)
    };
    for stmt in g::FORGET {
        exec(
            tx,
            stmt,
            params![
                node,
                forget_epoch,
                forget_generation,
                at.saturating_sub(g::ABANDONED_AFTER_MS)
            ],
        )
        .map_err(sql("forget inventory generations"))?;
    }
    Ok(())
}

impl SqliteStore {
    /// Store a batch of reports: all in one transaction (one commit, one fsync), or, when
    /// anything in it fails, each in its own so that one bad report fails alone. Outcomes are
    /// in the order of `reports`; none is returned before its transaction committed.
    pub(super) fn ingest_batch_blocking(
        conn: &mut Connection,
        reports: &[&IncomingReport],
    ) -> Vec<Result<IngestOutcome, StoreError>> {
        if reports.len() > 1 {
            let together = (|| {
                let tx = conn.transaction().map_err(sql("begin"))?;
                let outcomes = reports
                    .iter()
                    .map(|r| Self::apply_report(&tx, r))
                    .collect::<Result<Vec<_>, _>>()?;
                tx.commit().map_err(sql("commit"))?;
                Ok::<_, StoreError>(outcomes)
            })();
            match together {
                Ok(outcomes) => return outcomes.into_iter().map(Ok).collect(),
                Err(e) => {
                    tracing::debug!(reports = reports.len(), error = %e, "batch failed; storing its reports one by one");
                }
            }
        }
        reports
            .iter()
            .map(|r| {
                let tx = conn.transaction().map_err(sql("begin"))?;
                let outcome = Self::apply_report(&tx, r)?;
                tx.commit().map_err(sql("commit"))?;
                Ok(outcome)
            })
            .collect()
    }

    /// One report's statements inside `tx` (not committed here).
    pub(super) fn apply_report(
        tx: &rusqlite::Transaction<'_>,
        r: &IncomingReport,
    ) -> Result<IngestOutcome, StoreError> {
        let epoch = to_i64(r.epoch, "epoch")?;
        let seq = to_i64(r.seq, "seq")?;
        let inserted = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO reports (node, epoch, seq, observed_ms, received_ms, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(sql("prepare insert report"))?
            .execute(params![
                r.node,
                epoch,
                seq,
                r.observed_unix_ms,
                r.received_unix_ms,
                r.body
            ])
            .map_err(sql("insert report"))?;
        if inserted == 0 {
            // Already stored. A re-send carries the same observation time; a different one
            // means the agent reused a sequence number (a lost spool state): count it so
            // that it is visible, and keep the first report.
            let stored_ms: i64 = tx
                .query_row(
                    "SELECT observed_ms FROM reports WHERE node = ?1 AND epoch = ?2 AND seq = ?3",
                    params![r.node, epoch, seq],
                    |row| row.get(0),
                )
                .map_err(sql("read duplicate"))?;
            if stored_ms != r.observed_unix_ms {
                tracing::error!(node = %r.node, epoch = r.epoch, seq = r.seq, "sequence number reused for a different report");
                exec(tx,
                    "UPDATE node_epochs SET conflicts = conflicts + 1 WHERE node = ?1 AND epoch = ?2",
                    params![r.node, epoch],
                )
                .map_err(sql("count conflict"))?;
                return Ok(IngestOutcome::Conflict);
            }
            return Ok(IngestOutcome::Duplicate);
        }
        exec(
            tx,
            "INSERT INTO node_epochs (node, epoch, reports, last_seq, first_seen_ms, last_seen_ms)
             VALUES (?1, ?2, 1, ?3, ?4, ?4)
             ON CONFLICT (node, epoch) DO UPDATE SET
                reports = reports + 1,
                last_seq = max(last_seq, excluded.last_seq),
                last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
            params![r.node, epoch, seq, r.received_unix_ms],
        )
        .map_err(sql("update epoch counters"))?;
        let labels = serde_json::to_string(&r.labels).unwrap_or_else(|_| "{}".to_owned());
        let mem_used = to_i64(r.memory_used_bytes, "memory_used_bytes")?;
        let mem_total = to_i64(r.memory_total_bytes, "memory_total_bytes")?;
        exec(tx,
            "INSERT INTO nodes (node, site, country, hostname, agent_version, labels, first_seen_ms,
                                last_seen_ms, last_observed_ms, latest_epoch, cpu_percent,
                                memory_used_bytes, memory_total_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (node) DO UPDATE SET
                last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),
                latest_epoch = max(latest_epoch, excluded.latest_epoch),
                site = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.site ELSE site END,
                country = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.country ELSE country END,
                hostname = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.hostname ELSE hostname END,
                agent_version = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.agent_version ELSE agent_version END,
                labels = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.labels ELSE labels END,
                cpu_percent = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.cpu_percent ELSE cpu_percent END,
                memory_used_bytes = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.memory_used_bytes ELSE memory_used_bytes END,
                memory_total_bytes = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.memory_total_bytes ELSE memory_total_bytes END,
                last_observed_ms = max(last_observed_ms, excluded.last_observed_ms)",
            params![
                r.node,
                r.site,
                r.country,
                r.hostname,
                r.agent_version,
                labels,
                r.received_unix_ms,
                r.observed_unix_ms,
                epoch,
                f64::from(r.cpu_percent),
                mem_used,
                mem_total,
            ],
        )
        .map_err(sql("update node"))?;
        for g in &r.gaps {
            exec(tx,
                "INSERT OR IGNORE INTO gaps (node, epoch, first_seq, last_seq, reason, dropped_ms, received_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    r.node,
                    epoch,
                    to_i64(g.first_seq, "gap first_seq")?,
                    to_i64(g.last_seq, "gap last_seq")?,
                    g.reason,
                    g.dropped_unix_ms,
                    r.received_unix_ms
                ],
            )
            .map_err(sql("insert gap"))?;
        }
        exec(
            tx,
            "INSERT INTO derive_queue (node, epoch, seq, received_ms) VALUES (?1, ?2, ?3, ?4)",
            params![r.node, epoch, seq, r.received_unix_ms],
        )
        .map_err(sql("queue for derivation"))?;
        Ok(IngestOutcome::Stored)
    }

    /// Derive one report inside `tx` when this transaction takes its queue row; false when
    /// the row was gone (derived already). The row is matched by its report's key as well as
    /// its id: SQLite gives a deleted row's id to the next insert when it was the largest, so
    /// a batch read before its reports were derived another way (reports that may breach a
    /// rule are derived first) could otherwise take a newer report's row by its old id.
    pub(super) fn derive_one(
        tx: &rusqlite::Transaction<'_>,
        d: &Derivation,
        raw: Option<&crate::store::minutes::ForeignFlows>,
    ) -> Result<bool, StoreError> {
        let r = &d.report;
        let epoch = to_i64(r.epoch, "epoch")?;
        let seq = to_i64(r.seq, "seq")?;
        let taken = exec(
            tx,
            "DELETE FROM derive_queue WHERE id = ?1 AND node = ?2 AND epoch = ?3 AND seq = ?4",
            params![d.queue_id, r.node, epoch, seq],
        )
        .map_err(sql("take from derive queue"))?;
        if taken == 0 {
            return Ok(false);
        }
        insert_telemetry(tx, r, epoch)?;
        apply_weights(tx, r)?;
        super::training::apply_training(tx, r)?;
        keep_raw_flows(tx, r, epoch, seq, raw)?;
        super::containers::apply_containers(tx, r)?;
        Ok(true)
    }
}

/// The oldest reports waiting in the derive queue, with their bodies.
pub(super) async fn underived(
    store: &SqliteStore,
    limit: u32,
) -> Result<Vec<Underived>, StoreError> {
    store
        .read(move |c| {
            read_underived(
                c,
                &format!("{UNDERIVED} ORDER BY q.id LIMIT ?1"),
                params![limit],
            )
        })
        .await
}

/// [`crate::store::Store::underived_of`]: the queue has no index by node (every append would
/// pay for one); it holds what is not derived yet, a few seconds' worth under load, so this
/// reads it whole and keeps `nodes`' rows.
pub(super) async fn underived_of(
    store: &SqliteStore,
    nodes: &[String],
    limit: u32,
) -> Result<Vec<Underived>, StoreError> {
    if nodes.is_empty() {
        return Ok(Vec::new());
    }
    let nodes = serde_json::to_string(nodes).map_err(|e| StoreError::Task(e.to_string()))?;
    store
        .read(move |c| {
            read_underived(
                c,
                &format!(
                    "{UNDERIVED} WHERE q.node IN (SELECT value FROM json_each(?2))
                     ORDER BY q.id LIMIT ?1"
                ),
                params![limit, nodes],
            )
        })
        .await
}

/// Queued reports joined to their bodies (a `WHERE` and an `ORDER BY … LIMIT` follow).
const UNDERIVED: &str = "SELECT q.id, q.node, q.epoch, q.seq, q.received_ms, r.body
     FROM derive_queue q JOIN reports r
       ON r.node = q.node AND r.epoch = q.epoch AND r.seq = q.seq";

/// The rows of an [`UNDERIVED`] query.
fn read_underived(
    c: &Connection,
    text: &str,
    values: impl rusqlite::Params,
) -> Result<Vec<Underived>, StoreError> {
    let mut st = c.prepare_cached(text).map_err(sql("prepare underived"))?;
    let rows = st
        .query_map(values, |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, Vec<u8>>(5)?,
            ))
        })
        .map_err(sql("read underived"))?;
    let mut out = Vec::new();
    for row in rows {
        let (queue_id, node, epoch, seq, received_unix_ms, body) =
            row.map_err(sql("read underived"))?;
        out.push(Underived {
            queue_id,
            node,
            epoch: to_u64(epoch, "epoch")?,
            seq: to_u64(seq, "seq")?,
            received_unix_ms,
            body,
        });
    }
    Ok(out)
}

/// How long a derive transaction holds SQLite's writer, at least, before it lets appends that
/// wait go first: past it, at the end of a node's reports, the transaction commits what it
/// derived so far, the waiting appends are stored (and acknowledged), and the rest of the batch
/// goes on in a new transaction (PERFORMANCE.md §8s). Shorter slices acknowledge sooner and
/// derive at a higher cost per report (more, smaller commits).
pub(super) const DERIVE_SLICE: std::time::Duration = std::time::Duration::from_millis(20);

/// Derive a batch, in one transaction while no append waits for the writer. What needs no
/// database (the batch's flows merged by aggregate key, each report's raw foreign flows
/// encoded) is done before the writer is taken. The batch is written node by node (a node's
/// reports in queue order, with its merged flow rows: every derived row's key leads with its
/// node, so nothing is merged across nodes), and once the transaction has held the writer
/// for [`DERIVE_SLICE`] with appends waiting, it commits at the end of a node and lets them go
/// first: each commit takes its reports' queue rows with what they derive, so a crash between
/// two leaves the rest queued, derived once later. The commits are not fsynced
/// (`synchronous = NORMAL`): a crash of the machine can lose one only together with its queue
/// deletions, and the next append's fsync makes it durable (WAL frames are written in order),
/// so nothing is lost or derived twice.
pub(super) async fn derive(store: &SqliteStore, batch: Vec<Derivation>) -> Result<u64, StoreError> {
    let (writer, pending, syncer) = (
        store.writer.clone(),
        store.pending.clone(),
        store.syncer.clone(),
    );
    tokio::task::spawn_blocking(move || {
        derive_blocking(&writer, &pending, &syncer, &batch, |held| {
            held >= DERIVE_SLICE && lock(&pending).waiting()
        })
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

/// [`derive`] on this thread; `yield_to_appends(held)`, asked at the end of each node's
/// reports with how long the transaction has held the writer, says whether to commit there
/// and store the appends that wait.
pub(super) fn derive_blocking(
    writer: &Mutex<Connection>,
    pending: &Mutex<crate::store::Pending>,
    syncer: &Syncer,
    batch: &[Derivation],
    mut yield_to_appends: impl FnMut(std::time::Duration) -> bool,
) -> Result<u64, StoreError> {
    let nodes = by_node(batch);
    let mut sums = Vec::with_capacity(nodes.len());
    for reports in &nodes {
        let mut node_sums = std::collections::BTreeMap::new();
        for &i in reports {
            crate::store::minutes::add_report(&mut node_sums, &batch[i].report)?;
        }
        sums.push(node_sums);
    }
    let raw: Vec<Option<crate::store::minutes::ForeignFlows>> = batch
        .iter()
        .map(|d| crate::store::minutes::foreign_flows(&d.report))
        .collect();
    let mut conn = lock(writer);
    // Reports waiting to be appended go first: their acknowledgements would otherwise wait
    // for the derive transaction.
    serve_appends(&mut conn, pending, syncer);
    let mut derived = 0u64;
    let mut next = 0;
    while next < nodes.len() {
        let started = std::time::Instant::now();
        conn.execute_batch("PRAGMA synchronous = NORMAL")
            .map_err(sql("relax derive commit"))?;
        let part = derive_locked(
            &mut conn,
            batch,
            &nodes[next..],
            &sums[next..],
            &raw,
            &mut yield_to_appends,
        );
        let restored = conn
            .execute_batch("PRAGMA synchronous = FULL")
            .map_err(sql("restore synchronous"));
        let (nodes_done, n) = part?;
        restored?;
        WRITER.count(&WRITER.derive_commits, 1);
        WRITER.count(&WRITER.derive_ns, started.elapsed().as_nanos());
        derived += n;
        next += nodes_done;
        if next < nodes.len() {
            DERIVE_YIELDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            serve_appends(&mut conn, pending, syncer);
        }
    }
    Ok(derived)
}

/// Times a derive transaction committed early to let waiting appends go first (all SQLite
/// stores of this process).
static DERIVE_YIELDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times, in this process, a SQLite derive transaction committed early to let
/// waiting appends go first (for tests and benchmarks).
pub fn derive_yields() -> u64 {
    DERIVE_YIELDS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Store every report waiting to be appended, as [`ingest`]'s drainer does, on the writer this
/// thread holds (the drainer, waiting for the writer, then finds nothing and stops).
fn serve_appends(conn: &mut Connection, pending: &Mutex<crate::store::Pending>, syncer: &Syncer) {
    loop {
        let appends = lock(pending).take_batch();
        if appends.is_empty() {
            return;
        }
        append_batch(conn, appends, syncer);
    }
}

/// Store `appends` in one transaction (or each alone when that fails) and answer each once
/// the write-ahead log is synced past it: the commit does not wait for the sync, the
/// [`Syncer`] does, and the writer goes on meanwhile (PERFORMANCE.md §8t).
fn append_batch(conn: &mut Connection, appends: Vec<crate::store::Queued>, syncer: &Syncer) {
    let started = std::time::Instant::now();
    let reports: Vec<&IncomingReport> = appends.iter().map(|p| &p.report).collect();
    // Should the setting fail, the commit syncs by itself (`FULL`) and is answered at once.
    let relaxed = conn
        .execute_batch("PRAGMA synchronous = NORMAL")
        .inspect_err(|err| tracing::warn!(error = %err, "append commits sync by themselves"))
        .is_ok();
    let outcomes = SqliteStore::ingest_batch_blocking(conn, &reports);
    if relaxed && let Err(err) = conn.execute_batch("PRAGMA synchronous = FULL") {
        tracing::error!(error = %err, "the writer's synchronous = FULL not restored");
    }
    WRITER.count(&WRITER.append_batches, 1);
    WRITER.count(&WRITER.appended, reports.len());
    WRITER.count(&WRITER.append_ns, started.elapsed().as_nanos());
    if relaxed {
        syncer.answer_after_sync(appends, outcomes);
    } else {
        crate::store::answer(appends, outcomes);
    }
}

/// The group commit's drainer: takes the writer and stores batch after batch until nothing
/// waits. Should it panic, the reports waiting are failed (their callers see an error, their
/// agents send them again) and the next push starts another drainer.
pub(super) fn drain(
    writer: &Mutex<Connection>,
    pending: &Mutex<crate::store::Pending>,
    syncer: &Syncer,
) {
    struct Stop<'a>(&'a Mutex<crate::store::Pending>);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                drop(lock(self.0).take_all_and_stop());
            }
        }
    }
    let _stop = Stop(pending);
    let mut first = true;
    loop {
        // Reports that queue while the log syncs are committed together as it ends (the
        // writer free meanwhile, for derivation). With nothing queued, no wait: the drainer
        // stops below.
        if lock(pending).waiting() {
            syncer.wait_until_idle();
        }
        let mut conn = lock(writer);
        let appends = lock(pending).take_batch_or_stop();
        if appends.is_empty() {
            if first {
                WRITER.count(&WRITER.empty_takes, 1);
            }
            return;
        }
        first = false;
        append_batch(&mut conn, appends, syncer);
    }
}

/// What SQLite's single writer did in this process, all stores together (for benchmarks: how
/// the writer's time divides between appends, which acknowledgements wait for, and derivation).
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Append transactions (group commits) and the reports they stored.
    pub append_batches: std::sync::atomic::AtomicU64,
    /// Reports stored by append transactions.
    pub appended: std::sync::atomic::AtomicU64,
    /// Time the writer spent storing appends, ns.
    pub append_ns: std::sync::atomic::AtomicU64,
    /// Times a drainer took the writer and found nothing left to store (the derive transaction
    /// had stored it).
    pub empty_takes: std::sync::atomic::AtomicU64,
    /// Derive transactions committed.
    pub derive_commits: std::sync::atomic::AtomicU64,
    /// Time the writer spent in derive transactions, ns.
    pub derive_ns: std::sync::atomic::AtomicU64,
}

impl WriterStats {
    fn count(&self, counter: &std::sync::atomic::AtomicU64, n: impl TryInto<u64>) {
        counter.fetch_add(
            n.try_into().unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// The writer's counters of this process.
pub static WRITER: WriterStats = WriterStats {
    append_batches: std::sync::atomic::AtomicU64::new(0),
    appended: std::sync::atomic::AtomicU64::new(0),
    append_ns: std::sync::atomic::AtomicU64::new(0),
    empty_takes: std::sync::atomic::AtomicU64::new(0),
    derive_commits: std::sync::atomic::AtomicU64::new(0),
    derive_ns: std::sync::atomic::AtomicU64::new(0),
};

/// The batch's indices grouped by node, nodes in order of first appearance, each node's
/// reports in queue order.
fn by_node(batch: &[Derivation]) -> Vec<Vec<usize>> {
    let mut at: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut nodes: Vec<Vec<usize>> = Vec::new();
    for (i, d) in batch.iter().enumerate() {
        let slot = *at.entry(d.report.node.as_str()).or_insert_with(|| {
            nodes.push(Vec::new());
            nodes.len() - 1
        });
        nodes[slot].push(i);
    }
    nodes
}

/// One derive transaction on the writer: `nodes`' reports (indices into `batch`, with their
/// merged flow rows `sums` and raw foreign flows `raw`, made assuming every queue row is still
/// there; made again from the reports taken when one was not), node after node until all are
/// written or `yield_to_appends` says to stop. How many nodes it wrote and how many reports it
/// derived.
fn derive_locked(
    conn: &mut Connection,
    batch: &[Derivation],
    nodes: &[Vec<usize>],
    sums: &[std::collections::BTreeMap<
        crate::store::minutes::MinuteKey<'_>,
        crate::store::minutes::MinuteSums<'_>,
    >],
    raw: &[Option<crate::store::minutes::ForeignFlows>],
    yield_to_appends: &mut impl FnMut(std::time::Duration) -> bool,
) -> Result<(usize, u64), StoreError> {
    let started = std::time::Instant::now();
    let tx = conn.transaction().map_err(sql("begin derive"))?;
    let mut derived = 0u64;
    let mut done = 0;
    for (reports, node_sums) in nodes.iter().zip(sums) {
        let mut taken = Vec::with_capacity(reports.len());
        for &i in reports {
            if SqliteStore::derive_one(&tx, &batch[i], raw[i].as_ref())? {
                taken.push(&batch[i]);
            }
        }
        if taken.len() == reports.len() {
            write_minutes(&tx, node_sums)?;
        } else {
            let mut mine = std::collections::BTreeMap::new();
            for d in &taken {
                crate::store::minutes::add_report(&mut mine, &d.report)?;
            }
            write_minutes(&tx, &mine)?;
        }
        derived += u64::try_from(taken.len()).unwrap_or(u64::MAX);
        done += 1;
        if done < nodes.len() && yield_to_appends(started.elapsed()) {
            break;
        }
    }
    tx.commit().map_err(sql("commit derive"))?;
    Ok((done, derived))
}

/// Group commit: the report joins the queue; the one drainer ([`drain`], started by the push
/// that found none running) stores every queued report (up to
/// [`crate::store::MAX_BATCH_REPORTS`] per transaction) with one commit and one fsync, then
/// answers each. The drainer is a blocking task of its own, not cancelled with any caller, so a
/// caller that goes away cannot abort the batch others wait on.
pub(super) async fn ingest(
    store: &SqliteStore,
    report: IncomingReport,
) -> Result<IngestOutcome, StoreError> {
    let (done, start) = lock(&store.pending).push(report);
    if start {
        let (writer, pending, syncer) = (
            store.writer.clone(),
            store.pending.clone(),
            store.syncer.clone(),
        );
        drop(tokio::task::spawn_blocking(move || {
            drain(&writer, &pending, &syncer);
        }));
    }
    done.await
        .map_err(|_| StoreError::Task("ingest answer lost".to_owned()))?
}

pub(super) async fn note_peer(store: &SqliteStore, peer: NodePeer) -> Result<(), StoreError> {
    store.write(move |c| {
        c.execute(
            "INSERT INTO node_peers (node, address, country, asn, source, seen_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (node) DO UPDATE SET address = excluded.address, country = excluded.country,
                 asn = excluded.asn, source = excluded.source, seen_ms = excluded.seen_ms
             WHERE excluded.seen_ms >= node_peers.seen_ms",
            params![
                peer.node,
                peer.address,
                peer.country,
                i64::from(peer.asn),
                peer.source,
                peer.seen_unix_ms
            ],
        )
        .map_err(sql("record node peer"))?;
        Ok(())
    })
    .await
}

/// SQLite derives on its one writer: no second deriver ([`crate::store::Store::another_deriver`]).
pub(super) fn another_deriver(_: &SqliteStore) -> Option<std::sync::Arc<dyn crate::store::Store>> {
    None
}
