//! Storing reports: group commit of queued reports in a spawned task, one transaction per
//! batch (or per report when a batch fails) retried on serialisation races, prepared
//! statements, and every row a report makes (node facts, telemetry, flows, weights, the
//! address it came from).

use super::*;

/// Each replica derives the partitions it holds ([`super::partitions`]).
pub(super) const DERIVES_A_SHARE: bool = true;

pub(super) const INSERT_REPORT: &str =
    "INSERT INTO reports (node, epoch, seq, observed_ms, received_ms, body)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (node, epoch, seq) DO NOTHING";

pub(super) const READ_DUPLICATE: &str =
    "SELECT observed_ms FROM reports WHERE node = $1 AND epoch = $2 AND seq = $3";

pub(super) const COUNT_CONFLICT: &str =
    "UPDATE node_epochs SET conflicts = conflicts + 1 WHERE node = $1 AND epoch = $2";

pub(super) const UPSERT_EPOCH: &str =
    "INSERT INTO node_epochs (node, epoch, reports, last_seq, first_seen_ms, last_seen_ms)
     VALUES ($1, $2, 1, $3, $4, $4)
     ON CONFLICT (node, epoch) DO UPDATE SET
        reports = node_epochs.reports + 1,
        last_seq = GREATEST(node_epochs.last_seq, EXCLUDED.last_seq),
        last_seen_ms = GREATEST(node_epochs.last_seen_ms, EXCLUDED.last_seen_ms)";

/// How a node row merges into the stored one (shared by [`UPSERT_NODE`] and [`APPEND_NODES`]).
macro_rules! node_merge {
    () => {
        "ON CONFLICT (node) DO UPDATE SET
        last_seen_ms = GREATEST(nodes.last_seen_ms, EXCLUDED.last_seen_ms),
        latest_epoch = GREATEST(nodes.latest_epoch, EXCLUDED.latest_epoch),
        site = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                    THEN EXCLUDED.site ELSE nodes.site END,
        country = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                       THEN EXCLUDED.country ELSE nodes.country END,
        hostname = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                        THEN EXCLUDED.hostname ELSE nodes.hostname END,
        agent_version = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                             THEN EXCLUDED.agent_version ELSE nodes.agent_version END,
        labels = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                      THEN EXCLUDED.labels ELSE nodes.labels END,
        cpu_percent = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                           THEN EXCLUDED.cpu_percent ELSE nodes.cpu_percent END,
        memory_used_bytes = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                                 THEN EXCLUDED.memory_used_bytes ELSE nodes.memory_used_bytes END,
        memory_total_bytes = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                                  THEN EXCLUDED.memory_total_bytes ELSE nodes.memory_total_bytes END,
        last_observed_ms = GREATEST(nodes.last_observed_ms, EXCLUDED.last_observed_ms)"
    };
}

pub(super) const UPSERT_NODE: &str = concat!(
    "INSERT INTO nodes (node, site, country, hostname, agent_version, labels, first_seen_ms,
                        last_seen_ms, last_observed_ms, latest_epoch, cpu_percent,
                        memory_used_bytes, memory_total_bytes)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $10, $11, $12)
",
    node_merge!()
);

pub(super) const INSERT_GAP: &str =
    "INSERT INTO gaps (node, epoch, first_seq, last_seq, reason, dropped_ms, received_ms)
     VALUES ($1, $2, $3, $4, $5, $6, $7)
     ON CONFLICT (node, epoch, first_seq, last_seq) DO NOTHING";

pub(super) const ENQUEUE: &str =
    "INSERT INTO derive_queue (node, epoch, seq, received_ms) VALUES ($1, $2, $3, $4)";

/// A batch's keys and bodies in one statement (key order); the keys stored come back.
pub(super) const APPEND_REPORTS: &str =
    "INSERT INTO reports (node, epoch, seq, observed_ms, received_ms, body)
     SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BYTEA[])
     ON CONFLICT (node, epoch, seq) DO NOTHING
     RETURNING node, epoch, seq";

/// A batch's epoch counters, one row per (node, epoch) ([`UPSERT_EPOCH`] summed).
pub(super) const APPEND_EPOCHS: &str =
    "INSERT INTO node_epochs (node, epoch, reports, last_seq, first_seen_ms, last_seen_ms)
     SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[])
     ON CONFLICT (node, epoch) DO UPDATE SET
        reports = node_epochs.reports + EXCLUDED.reports,
        last_seq = GREATEST(node_epochs.last_seq, EXCLUDED.last_seq),
        last_seen_ms = GREATEST(node_epochs.last_seen_ms, EXCLUDED.last_seen_ms)";

/// A batch's node facts, one row per node ([`UPSERT_NODE`]'s merge; the first and the latest
/// reception times apart).
pub(super) const APPEND_NODES: &str = concat!(
    "INSERT INTO nodes (node, site, country, hostname, agent_version, labels, first_seen_ms,
                            last_seen_ms, last_observed_ms, latest_epoch, cpu_percent,
                            memory_used_bytes, memory_total_bytes)
         SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[],
                              $7::BIGINT[], $8::BIGINT[], $9::BIGINT[], $10::BIGINT[],
                              $11::DOUBLE PRECISION[], $12::BIGINT[], $13::BIGINT[])
         ",
    node_merge!()
);

/// A batch's gaps in one statement.
pub(super) const APPEND_GAPS: &str =
    "INSERT INTO gaps (node, epoch, first_seq, last_seq, reason, dropped_ms, received_ms)
     SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::TEXT[], $6::BIGINT[],
                          $7::BIGINT[])
     ON CONFLICT (node, epoch, first_seq, last_seq) DO NOTHING";

/// A batch's derive queue rows in one statement (key order, so queue order within a node).
pub(super) const APPEND_QUEUE: &str = "INSERT INTO derive_queue (node, epoch, seq, received_ms)
     SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[])";

pub(super) const TAKE_QUEUED: &str = "DELETE FROM derive_queue WHERE id = ANY($1) RETURNING id";

/// A derive batch's host samples in one statement (one array per column; the caller keeps
/// the last of rows with the same key: one statement may not update a row twice).
pub(super) const UPSERT_HOST_SAMPLES: &str = "INSERT INTO host_samples (node, observed_ms, cpu_percent, load_1, memory_used_bytes,
                          memory_total_bytes, swap_used_bytes, process_count)
     SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::DOUBLE PRECISION[], $4::DOUBLE PRECISION[],
                          $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::BIGINT[])
     ON CONFLICT (node, observed_ms) DO UPDATE SET
        cpu_percent = EXCLUDED.cpu_percent, load_1 = EXCLUDED.load_1,
        memory_used_bytes = EXCLUDED.memory_used_bytes, memory_total_bytes = EXCLUDED.memory_total_bytes,
        swap_used_bytes = EXCLUDED.swap_used_bytes, process_count = EXCLUDED.process_count";

/// A derive batch's GPU samples in one statement.
pub(super) const UPSERT_GPU_SAMPLES: &str = "INSERT INTO gpu_samples (node, gpu_uuid, observed_ms, gpu_index, name, utilization_percent,
         memory_util_percent, memory_used_bytes, memory_total_bytes, power_milliwatts, temperature_celsius, error)
     SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::TEXT[], $6::BIGINT[],
                          $7::BIGINT[], $8::BIGINT[], $9::BIGINT[], $10::BIGINT[], $11::BIGINT[], $12::TEXT[])
     ON CONFLICT (node, gpu_uuid, observed_ms) DO UPDATE SET
        gpu_index = EXCLUDED.gpu_index, name = EXCLUDED.name,
        utilization_percent = EXCLUDED.utilization_percent, memory_util_percent = EXCLUDED.memory_util_percent,
        memory_used_bytes = EXCLUDED.memory_used_bytes, memory_total_bytes = EXCLUDED.memory_total_bytes,
        power_milliwatts = EXCLUDED.power_milliwatts, temperature_celsius = EXCLUDED.temperature_celsius,
        error = EXCLUDED.error";

/// A derive batch's GPU usage per process in one statement.
pub(super) const UPSERT_GPU_USAGE: &str = "INSERT INTO gpu_usage (node, observed_ms, gpu_uuid, pid, process_name, exe, container_id,
                       gpu_seconds, used_memory_bytes)
     SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::BIGINT[], $5::TEXT[], $6::TEXT[],
                          $7::TEXT[], $8::DOUBLE PRECISION[], $9::BIGINT[])
     ON CONFLICT (node, observed_ms, gpu_uuid, pid) DO UPDATE SET
        process_name = EXCLUDED.process_name, exe = EXCLUDED.exe, container_id = EXCLUDED.container_id,
        gpu_seconds = EXCLUDED.gpu_seconds, used_memory_bytes = EXCLUDED.used_memory_bytes";

/// The nodes' latest GPU columns from a derive batch, in one statement: a report's columns
/// land only when it is its node's newest (`last_observed_ms`).
pub(super) const UPDATE_NODE_GPUS: &str = "UPDATE nodes SET gpu_state = u.state, gpu_count = u.count,
        gpu_util_percent = u.util, gpu_memory_used_bytes = u.mem_used, gpu_memory_total_bytes = u.mem_total
     FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::DOUBLE PRECISION[], $5::BIGINT[], $6::BIGINT[],
                 $7::BIGINT[]) AS u(node, state, count, util, mem_used, mem_total, at)
     WHERE nodes.node = u.node AND nodes.last_observed_ms = u.at";

/// Every flow aggregate of a derive batch in one statement: one array per column (the caller
/// merges rows with the same key first: one statement may not update a row twice); the
/// verdict and measurement columns last ([`crate::store::VERDICT_COLUMNS`]).
fn aggregate_flows() -> String {
    format!(
        "INSERT INTO flows_minute (node, minute_ms, pid, process, protocol, direction, remote_address,
         remote_port, country, asn, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us,
         {})
     SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[],
                          $8::BIGINT[], $9::TEXT[], $10::BIGINT[], $11::TEXT[], $12::TEXT[], $13::BIGINT[],
                          $14::BIGINT[], $15::BIGINT[], $16::BIGINT[],
                          $17::TEXT[], $18::BIGINT[], $19::TEXT[], $20::TEXT[], $21::BIGINT[], $22::BIGINT[],
                          $23::BIGINT[], $24::BIGINT[])
     ON CONFLICT (node, minute_ms, pid, protocol, direction, remote_address, remote_port) DO UPDATE SET
        bytes_sent = flows_minute.bytes_sent + EXCLUDED.bytes_sent,
        bytes_received = flows_minute.bytes_received + EXCLUDED.bytes_received,
        connections = flows_minute.connections + EXCLUDED.connections,
        min_rtt_us = CASE WHEN flows_minute.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                          WHEN EXCLUDED.min_rtt_us = 0 THEN flows_minute.min_rtt_us
                          ELSE LEAST(flows_minute.min_rtt_us, EXCLUDED.min_rtt_us) END,
        process = CASE WHEN EXCLUDED.process <> '' THEN EXCLUDED.process ELSE flows_minute.process END,
        {}",
        crate::store::VERDICT_COLUMNS,
        crate::store::VERDICT_UPSERT
    )
}

/// [`aggregate_flows`], written once per process.
pub(super) static AGGREGATE_FLOWS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(aggregate_flows);

/// [`aggregate_flows`] without its `ON CONFLICT`: for rows in minutes newer than any this
/// deriver wrote for their node ([`NewestMinutes`]), which no row can hold yet. A plain insert
/// costs about 40 % less than a speculative one (PostgreSQL 15, 118,000 rows of this table:
/// 470–540 against 780–830 ms).
pub(super) static INSERT_FLOWS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let upsert = aggregate_flows();
    let plain = upsert
        .split(" ON CONFLICT ")
        .next()
        .unwrap_or(upsert.as_str());
    plain.to_owned()
});

/// The newest minute this deriver connection has committed `flows_minute` rows in, per node.
/// A minute newer than its node's entry holds no row yet, unless another deriver wrote it
/// (a partition that moved: the map is cleared whenever this connection takes partitions) or
/// a concurrent batch of this one did; a plain insert that collides anyway is rolled back to
/// its savepoint and done as an upsert, and the map is cleared. A node with no entry (every
/// node after a start, a reconnection or a clear) is upserted until a commit gives it one
/// (reading each unknown node's newest stored minute first was tried: the same derive-only
/// rate, §8u of docs/PERFORMANCE.md).
#[derive(Debug, Default)]
pub(super) struct NewestMinutes(std::collections::HashMap<String, i64>);

/// Entries past which [`NewestMinutes`] starts again empty (a node's entry is about 60 bytes).
const NEWEST_MINUTES_MAX: usize = 1_000_000;

impl NewestMinutes {
    /// Whether rows of `node` in `minute` are certainly new.
    fn is_new(&self, node: &str, minute: i64) -> bool {
        self.0.get(node).is_some_and(|&newest| minute > newest)
    }

    /// After a commit: the batch's rows are in.
    fn committed<'a>(&mut self, keys: impl Iterator<Item = (&'a str, i64)>) {
        if self.0.len() > NEWEST_MINUTES_MAX {
            self.0.clear();
        }
        for (node, minute) in keys {
            match self.0.get_mut(node) {
                Some(newest) => *newest = (*newest).max(minute),
                None => {
                    self.0.insert(node.to_owned(), minute);
                }
            }
        }
    }

    /// Forget every node (another writer may have written their minutes).
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

/// A derive batch's raw foreign flows, one row per report
/// ([`crate::store::minutes::foreign_flows`]), in one statement.
pub(super) const KEEP_RAW_FLOWS: &str = "INSERT INTO foreign_flows (node, epoch, seq, start_ms, end_ms, flow_count, countries, flows)
     SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[],
                          $7::TEXT[], $8::BYTEA[])
     ON CONFLICT (node, epoch, seq) DO NOTHING";

pub(super) const UPSERT_WEIGHT: &str = "INSERT INTO weight_files (node, path, format, size_bytes, mtime_ms, device, inode, sha256, model,
         revision, repo_path, identity_source, publisher, parameter_count, mount_point, fs_type, network,
         server_address, users, detail, first_seen_ms, last_seen_ms, removed_ms)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
             $21, $21, NULL)
     ON CONFLICT (node, path) DO UPDATE SET
        format = EXCLUDED.format, size_bytes = EXCLUDED.size_bytes, mtime_ms = EXCLUDED.mtime_ms,
        device = EXCLUDED.device, inode = EXCLUDED.inode,
        sha256 = CASE WHEN EXCLUDED.sha256 = '' AND weight_files.size_bytes = EXCLUDED.size_bytes
                           AND weight_files.mtime_ms = EXCLUDED.mtime_ms
                      THEN weight_files.sha256 ELSE EXCLUDED.sha256 END,
        model = EXCLUDED.model, revision = EXCLUDED.revision, repo_path = EXCLUDED.repo_path,
        identity_source = EXCLUDED.identity_source, publisher = EXCLUDED.publisher,
        parameter_count = EXCLUDED.parameter_count, mount_point = EXCLUDED.mount_point,
        fs_type = EXCLUDED.fs_type, network = EXCLUDED.network, server_address = EXCLUDED.server_address,
        users = EXCLUDED.users, detail = EXCLUDED.detail, last_seen_ms = EXCLUDED.last_seen_ms,
        first_seen_ms = CASE WHEN weight_files.removed_ms IS NULL THEN weight_files.first_seen_ms
                             ELSE EXCLUDED.first_seen_ms END,
        removed_ms = NULL";

pub(super) const REMOVE_WEIGHT: &str = "UPDATE weight_files SET removed_ms = $3
     WHERE node = $1 AND path = $2 AND removed_ms IS NULL";

pub(super) const REMOVE_UNLISTED_WEIGHTS: &str = "UPDATE weight_files SET removed_ms = $2
     WHERE node = $1 AND removed_ms IS NULL AND last_seen_ms < $2";

/// Statements prepared once per writer connection (ingest is the hot path).
pub(super) struct Statements {
    insert_report: Statement,
    read_duplicate: Statement,
    count_conflict: Statement,
    upsert_epoch: Statement,
    upsert_node: Statement,
    insert_gap: Statement,
    enqueue: Statement,
    append_reports: Statement,
    append_epochs: Statement,
    append_nodes: Statement,
    append_gaps: Statement,
    append_queue: Statement,
    take_queued: Statement,
    upsert_host_samples: Statement,
    upsert_gpu_samples: Statement,
    upsert_gpu_usage: Statement,
    update_node_gpus: Statement,
    aggregate_flows: Statement,
    insert_flows: Statement,
    keep_raw_flows: Statement,
    upsert_weight: Statement,
    remove_weight: Statement,
    remove_unlisted_weights: Statement,
    lock_rollup_shared: Statement,
    read_rollup_state: Statement,
    late_sums_out: Statement,
    late_sums_in: Statement,
    late_contested_hour_out: Statement,
    late_contested_hour_in: Statement,
    late_contested_day_out: Statement,
    late_contested_day_in: Statement,
}

impl Statements {
    pub(super) async fn prepare(c: &Client) -> Result<Self, StoreError> {
        let p = |text: &'static str| async move {
            c.prepare(text).await.map_err(pg("prepare statement"))
        };
        Ok(Self {
            insert_report: p(INSERT_REPORT).await?,
            read_duplicate: p(READ_DUPLICATE).await?,
            count_conflict: p(COUNT_CONFLICT).await?,
            upsert_epoch: p(UPSERT_EPOCH).await?,
            upsert_node: p(UPSERT_NODE).await?,
            insert_gap: p(INSERT_GAP).await?,
            enqueue: p(ENQUEUE).await?,
            append_reports: p(APPEND_REPORTS).await?,
            append_epochs: p(APPEND_EPOCHS).await?,
            append_nodes: p(APPEND_NODES).await?,
            append_gaps: p(APPEND_GAPS).await?,
            append_queue: p(APPEND_QUEUE).await?,
            take_queued: p(TAKE_QUEUED).await?,
            upsert_host_samples: p(UPSERT_HOST_SAMPLES).await?,
            upsert_gpu_samples: p(UPSERT_GPU_SAMPLES).await?,
            upsert_gpu_usage: p(UPSERT_GPU_USAGE).await?,
            update_node_gpus: p(UPDATE_NODE_GPUS).await?,
            aggregate_flows: p(AGGREGATE_FLOWS.as_str()).await?,
            insert_flows: p(INSERT_FLOWS.as_str()).await?,
            keep_raw_flows: p(KEEP_RAW_FLOWS).await?,
            upsert_weight: p(UPSERT_WEIGHT).await?,
            remove_weight: p(REMOVE_WEIGHT).await?,
            remove_unlisted_weights: p(REMOVE_UNLISTED_WEIGHTS).await?,
            lock_rollup_shared: p(LOCK_ROLLUP_SHARED).await?,
            read_rollup_state: p(READ_ROLLUP_STATE).await?,
            late_sums_out: p(LATE_SUMS_OUT.as_str()).await?,
            late_sums_in: p(LATE_SUMS_IN.as_str()).await?,
            late_contested_hour_out: p(LATE_CONTESTED_HOUR_OUT.as_str()).await?,
            late_contested_hour_in: p(LATE_CONTESTED_HOUR_IN.as_str()).await?,
            late_contested_day_out: p(LATE_CONTESTED_DAY_OUT.as_str()).await?,
            late_contested_day_in: p(LATE_CONTESTED_DAY_IN.as_str()).await?,
        })
    }
}

/// Keep the last of rows with the same key, in their order: what one upsert per row, in
/// order, would leave (one statement may not update a row twice).
fn last_of_each<T, K: std::hash::Hash + Eq>(rows: Vec<T>, key: impl Fn(&T) -> K) -> Vec<T> {
    let mut last = std::collections::HashMap::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        last.insert(key(r), i);
    }
    rows.into_iter()
        .enumerate()
        .filter(|(i, r)| last.get(&key(r)) == Some(i))
        .map(|(_, r)| r)
        .collect()
}

/// The batch's time series rows (host samples, GPU samples, GPU usage), one statement per
/// table for the whole batch.
pub(super) async fn write_samples(
    tx: &Tx<'_>,
    st: &Statements,
    reports: &[&IncomingReport],
) -> Result<(), StoreError> {
    let hosts = last_of_each(
        reports
            .iter()
            .filter_map(|r| r.telemetry.host.as_ref().map(|h| (*r, h)))
            .collect(),
        |(r, _)| (r.node.as_str(), r.observed_unix_ms),
    );
    if !hosts.is_empty() {
        let (mut node, mut at, mut cpu, mut load) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut used, mut total, mut swap, mut procs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (r, h) in &hosts {
            node.push(r.node.as_str());
            at.push(r.observed_unix_ms);
            cpu.push(f64::from(h.cpu_percent));
            load.push(h.load_1);
            used.push(to_i64(h.memory_used_bytes, "memory_used_bytes")?);
            total.push(to_i64(h.memory_total_bytes, "memory_total_bytes")?);
            swap.push(to_i64(h.swap_used_bytes, "swap_used_bytes")?);
            procs.push(i64::from(h.process_count));
        }
        tx.execute(
            &st.upsert_host_samples,
            &[&node, &at, &cpu, &load, &used, &total, &swap, &procs],
        )
        .await
        .map_err(pg("insert host samples"))?;
    }
    let mut gpus = Vec::new();
    let mut usage = Vec::new();
    for r in reports {
        let t = &r.telemetry;
        if t.gpus.is_empty() {
            continue;
        }
        let names: std::collections::HashMap<u32, &sov_proto::pb::ProcessInfo> =
            t.processes.iter().map(|p| (p.pid, p)).collect();
        for g in &t.gpus {
            let uuid = if g.uuid.is_empty() {
                format!("index-{}", g.index)
            } else {
                g.uuid.clone()
            };
            for p in &g.processes {
                let info = names.get(&p.pid);
                usage.push((
                    *r,
                    uuid.clone(),
                    p,
                    info.map(|i| i.name.as_str()).unwrap_or(""),
                    info.map(|i| i.exe.as_str()).unwrap_or(""),
                    info.map(|i| i.container_id.as_str()).unwrap_or(""),
                ));
            }
            gpus.push((*r, uuid, g));
        }
    }
    let gpus = last_of_each(gpus, |(r, uuid, _)| {
        (r.node.as_str(), uuid.clone(), r.observed_unix_ms)
    });
    if !gpus.is_empty() {
        let (mut node, mut uuid, mut at, mut index) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut name, mut util, mut mem_util, mut used) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut total, mut power, mut temp, mut error) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (r, u, g) in &gpus {
            node.push(r.node.as_str());
            uuid.push(u.as_str());
            at.push(r.observed_unix_ms);
            index.push(i64::from(g.index));
            name.push(g.name.as_str());
            util.push(i64::from(g.utilization_gpu_percent));
            mem_util.push(i64::from(g.utilization_memory_percent));
            used.push(to_i64(g.memory_used_bytes, "gpu memory_used_bytes")?);
            total.push(to_i64(g.memory_total_bytes, "gpu memory_total_bytes")?);
            power.push(i64::from(g.power_draw_milliwatts));
            temp.push(i64::from(g.temperature_celsius));
            error.push(g.error.as_str());
        }
        tx.execute(
            &st.upsert_gpu_samples,
            &[
                &node, &uuid, &at, &index, &name, &util, &mem_util, &used, &total, &power, &temp,
                &error,
            ],
        )
        .await
        .map_err(pg("insert gpu samples"))?;
    }
    let usage = last_of_each(usage, |(r, uuid, p, ..)| {
        (r.node.as_str(), r.observed_unix_ms, uuid.clone(), p.pid)
    });
    if !usage.is_empty() {
        let (mut node, mut at, mut uuid, mut pid) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut name, mut exe, mut container, mut seconds, mut memory) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (r, u, p, n, e, c) in &usage {
            node.push(r.node.as_str());
            at.push(r.observed_unix_ms);
            uuid.push(u.as_str());
            pid.push(i64::from(p.pid));
            name.push(*n);
            exe.push(*e);
            container.push(*c);
            seconds.push(p.gpu_seconds);
            memory.push(to_i64(p.used_memory_bytes, "gpu process memory")?);
        }
        tx.execute(
            &st.upsert_gpu_usage,
            &[
                &node, &at, &uuid, &pid, &name, &exe, &container, &seconds, &memory,
            ],
        )
        .await
        .map_err(pg("insert gpu usage"))?;
    }
    Ok(())
}

/// The nodes' latest GPU columns from the batch, in one statement (sorted by node, so that
/// derivers lock node rows in one order).
pub(super) async fn update_node_gpus(
    tx: &Tx<'_>,
    st: &Statements,
    reports: &[&IncomingReport],
) -> Result<(), StoreError> {
    let mut rows = last_of_each(reports.to_vec(), |r| (r.node.as_str(), r.observed_unix_ms));
    rows.sort_by(|a, b| a.node.cmp(&b.node));
    if rows.is_empty() {
        return Ok(());
    }
    let (mut node, mut state, mut count, mut util) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut used, mut total, mut at) = (Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        let g = GpuSummary::of(&r.telemetry);
        node.push(r.node.as_str());
        state.push(g.state);
        count.push(i64::try_from(g.count).unwrap_or(i64::MAX));
        util.push(g.util);
        used.push(to_i64(g.mem_used, "gpu memory used")?);
        total.push(to_i64(g.mem_total, "gpu memory total")?);
        at.push(r.observed_unix_ms);
    }
    tx.execute(
        &st.update_node_gpus,
        &[&node, &state, &count, &util, &used, &total, &at],
    )
    .await
    .map_err(pg("update node gpus"))?;
    Ok(())
}

/// Write a batch's merged flow aggregates ([`crate::store::minutes`]) in one statement. Rows
/// of minutes already rolled up into hours (late) also move their hour rows
/// ([`crate::store::minutes::LATE_HOUR_KEY`]) and, when contested, their `contested_hour`
/// rows and (for days already rolled up) their `contested_day` rows, under the rollup's
/// advisory lock (shared) taken before `up_to_ms` is read, as the former triggers did; the
/// others are a plain upsert, with no trigger.
/// Returns whether a plain insert collided (then [`NewestMinutes`] must be cleared).
pub(super) async fn write_minutes(
    tx: &Tx<'_>,
    st: &Statements,
    sums: &std::collections::BTreeMap<
        crate::store::minutes::MinuteKey<'_>,
        crate::store::minutes::MinuteSums<'_>,
    >,
    newest: &NewestMinutes,
) -> Result<bool, StoreError> {
    if sums.is_empty() {
        return Ok(false);
    }
    // Two prepared statements (pipelined: one round trip): the read's snapshot must follow the
    // lock.
    let (_, up_to) = futures::try_join!(
        tx.execute(
            &st.lock_rollup_shared,
            &[&crate::store::rollup::ROLLUP_LOCK_KEY]
        ),
        tx.query_one(&st.read_rollup_state, &[]),
    )
    .map_err(pg("read rollup state"))?;
    let hours: i64 = get::<Option<i64>>(&up_to, 0, "read rollup state")?.unwrap_or(0);
    // Day rows hold whole rolled-up hours only (`days <= hours`, as the rollup keeps them).
    let days: i64 = get::<Option<i64>>(&up_to, 1, "read rollup state")?
        .unwrap_or(0)
        .min(hours);
    let (fresh, late) = crate::store::minutes::split_late(sums, hours);
    let (new, known): (Vec<_>, Vec<_>) = fresh
        .into_iter()
        .partition(|(k, _)| newest.is_new(k.0, k.1));
    let collided = insert_new_minutes(tx, st, &new).await?;
    upsert_minutes(tx, st, &known).await?;
    if late.is_empty() {
        return Ok(collided);
    }
    crate::store::minutes::count_late(late.len());
    let mut k = LateKeys::default();
    for ((node, m, p, proto, dir, addr, rport), _) in &late {
        k.node.push(node);
        k.minute.push(*m);
        k.pid.push(*p);
        k.protocol.push(proto);
        k.direction.push(dir);
        k.remote.push(addr);
        k.port.push(*rport);
    }
    let keys: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
        &k.node,
        &k.minute,
        &k.pid,
        &k.protocol,
        &k.direction,
        &k.remote,
        &k.port,
    ];
    let day_keys: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
        &k.node,
        &k.minute,
        &k.pid,
        &k.protocol,
        &k.direction,
        &k.remote,
        &k.port,
        &days,
    ];
    // Prepared and pipelined (one round trip; each is sent when first polled, so the server
    // runs them in this order): the stored rows' sums leave their hour and contested rows, the
    // rows are merged, the merged sums join the rows of their (possibly new) verdicts. A stored
    // contested row stays contested when merged ([`crate::store::VERDICT_UPSERT`]), but its
    // answers and physics (keys of the contested level) may change, so both contested steps
    // run for every batch with late rows.
    futures::try_join!(
        async {
            tx.execute(&st.late_sums_out, &keys)
                .await
                .map_err(pg("late flows: out of their hours"))
        },
        async {
            tx.execute(&st.late_contested_hour_out, &keys)
                .await
                .map_err(pg("late contested flows: out of their hours"))
        },
        async {
            tx.execute(&st.late_contested_day_out, &day_keys)
                .await
                .map_err(pg("late contested flows: out of their days"))
        },
        upsert_minutes(tx, st, &late),
        async {
            tx.execute(&st.late_sums_in, &keys)
                .await
                .map_err(pg("late flows: into their hours"))
        },
        async {
            tx.execute(&st.late_contested_hour_in, &keys)
                .await
                .map_err(pg("late contested flows: into their hours"))
        },
        async {
            tx.execute(&st.late_contested_day_in, &day_keys)
                .await
                .map_err(pg("late contested flows: into their days"))
        },
    )?;
    Ok(collided)
}

/// A merged `flows_minute` row of a batch: its key and its sums.
type MinuteRow<'s, 'a> = (
    &'s crate::store::minutes::MinuteKey<'a>,
    &'s crate::store::minutes::MinuteSums<'a>,
);

/// Rows no stored row can hold ([`NewestMinutes`]), by plain insert under a savepoint; should
/// one collide after all, rolled back to it and upserted. Returns whether one collided.
async fn insert_new_minutes(
    tx: &Tx<'_>,
    st: &Statements,
    rows: &[MinuteRow<'_, '_>],
) -> Result<bool, StoreError> {
    if rows.is_empty() {
        return Ok(false);
    }
    tx.batch_execute("SAVEPOINT new_minutes")
        .await
        .map_err(pg("savepoint before new flow minutes"))?;
    match write_minute_rows(tx, &st.insert_flows, rows).await {
        Ok(()) => {
            tx.batch_execute("RELEASE SAVEPOINT new_minutes")
                .await
                .map_err(pg("release savepoint of new flow minutes"))?;
            Ok(false)
        }
        Err(StoreError::Postgres { source, .. })
            if source.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            tracing::debug!("a new flow minute was already stored; upserting the batch's");
            tx.batch_execute("ROLLBACK TO SAVEPOINT new_minutes")
                .await
                .map_err(pg("roll back new flow minutes"))?;
            upsert_minutes(tx, st, rows).await?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// Take the rollup's advisory lock shared (the rollup takes it exclusively).
const LOCK_ROLLUP_SHARED: &str = "SELECT pg_advisory_xact_lock_shared($1)";

/// Where the hourly and daily rollups have come to.
const READ_ROLLUP_STATE: &str = "SELECT (SELECT up_to_ms FROM rollup_state WHERE name = 'hourly'),
            (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')";

/// The keys of a batch's late rows, as arrays for `unnest`.
#[derive(Default)]
struct LateKeys<'a> {
    node: Vec<&'a str>,
    minute: Vec<i64>,
    pid: Vec<i64>,
    protocol: Vec<&'static str>,
    direction: Vec<&'static str>,
    remote: Vec<&'a str>,
    port: Vec<i64>,
}

/// The stored minute rows of the late keys (`$1`..`$7`), named `m`.
const LATE_ROWS: &str = "flows_minute m
     JOIN unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::BIGINT[])
          AS k (node, minute_ms, pid, protocol, direction, remote_address, remote_port)
       ON m.node = k.node AND m.minute_ms = k.minute_ms AND m.pid = k.pid AND m.protocol = k.protocol
      AND m.direction = k.direction AND m.remote_address = k.remote_address AND m.remote_port = k.remote_port";

/// The late rows' stored sums leave their hour rows (before the upsert).
static LATE_SUMS_OUT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE flows_hour SET {}
         FROM (SELECT m.node, m.minute_ms - (m.minute_ms % 3600000) AS minute_ms, m.pid, m.process,
                      m.direction, m.country, m.asn, m.answers, m.contested, m.operator_country,
                      m.physics, SUM(m.bytes_sent) AS bytes_sent, SUM(m.bytes_received) AS bytes_received,
                      SUM(m.connections) AS connections, SUM(m.conntrack_bytes) AS conntrack_bytes,
                      SUM(m.unmeasured_flows) AS unmeasured_flows
               FROM {LATE_ROWS}
               GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11) AS m
         WHERE {}",
        crate::store::minutes::LATE_HOUR_SUMS_OUT,
        crate::store::minutes::LATE_HOUR_KEY
    )
});

/// The late rows' merged sums join the hour rows of their verdicts (after the upsert).
static LATE_SUMS_IN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO flows_hour ({})
         SELECT m.node, m.minute_ms - (m.minute_ms % 3600000), m.pid, m.process, m.direction, m.country,
                m.asn, m.answers, m.contested, m.operator_country, m.physics, MAX(m.org), MAX(m.geo_source),
                SUM(m.bytes_sent), SUM(m.bytes_received), SUM(m.connections),
                COALESCE(MIN(NULLIF(m.min_rtt_us, 0)), 0), MAX(m.distance_km),
                COALESCE(MIN(NULLIF(m.limit_km, 0)), 0), SUM(m.conntrack_bytes), SUM(m.unmeasured_flows)
         FROM {LATE_ROWS}
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
         ON CONFLICT (hour_ms, node, pid, process, direction, country, asn, answers, contested,
                      operator_country, physics) DO UPDATE SET {}",
        crate::store::minutes::HOUR_COLUMNS,
        crate::store::minutes::LATE_HOUR_SUMS_IN
    )
});

/// The contested level's key columns, in its tables' order after `node` and the period.
const CONTESTED_KEY: &str =
    "pid, process, direction, country, asn, answers, contested, operator_country,
     physics, remote_address, remote_port";

/// The late contested rows' stored sums leave their `table` rows (period `period_ms`, its
/// start column `column`) before the upsert; `filter` narrows the late rows (the day level
/// takes only minutes of days already rolled up, `$8`). What the trigger pair of migration
/// 0024 did for the old rows of an update.
fn late_contested_out(table: &str, column: &str, period_ms: i64, filter: &str) -> String {
    format!(
        "UPDATE {table} c SET
            bytes_sent = c.bytes_sent - m.bytes_sent,
            bytes_received = c.bytes_received - m.bytes_received,
            connections = c.connections - m.connections,
            conntrack_bytes = c.conntrack_bytes - m.conntrack_bytes,
            unmeasured_flows = c.unmeasured_flows - m.unmeasured_flows
         FROM (SELECT m.node, m.minute_ms - (m.minute_ms % {period_ms}) AS p, m.pid, m.process, m.direction,
                      m.country, m.asn, m.answers, m.contested, m.operator_country, m.physics,
                      m.remote_address, m.remote_port, SUM(m.bytes_sent) AS bytes_sent,
                      SUM(m.bytes_received) AS bytes_received, SUM(m.connections) AS connections,
                      SUM(m.conntrack_bytes) AS conntrack_bytes, SUM(m.unmeasured_flows) AS unmeasured_flows
               FROM {LATE_ROWS}
               WHERE m.contested <> 0{filter}
               GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13) AS m
         WHERE c.{column} = m.p AND c.node = m.node AND c.pid = m.pid AND c.process = m.process
           AND c.direction = m.direction AND c.country = m.country AND c.asn = m.asn
           AND c.answers = m.answers AND c.contested = m.contested
           AND c.operator_country = m.operator_country AND c.physics = m.physics
           AND c.remote_address = m.remote_address AND c.remote_port = m.remote_port"
    )
}

/// The late contested rows' merged sums join the `table` rows of their verdicts after the
/// upsert (inserted when missing), merged as the rollup merges minutes into the level.
fn late_contested_in(table: &str, column: &str, period_ms: i64, filter: &str) -> String {
    format!(
        "INSERT INTO {table} (node, {column}, {CONTESTED_KEY}, org, geo_source, bytes_sent,
                              bytes_received, connections, min_rtt_us, distance_km, limit_km,
                              conntrack_bytes, unmeasured_flows)
         SELECT m.node, m.minute_ms - (m.minute_ms % {period_ms}), m.pid, m.process, m.direction,
                m.country, m.asn, m.answers, m.contested, m.operator_country, m.physics,
                m.remote_address, m.remote_port, MAX(m.org), MAX(m.geo_source), SUM(m.bytes_sent),
                SUM(m.bytes_received), SUM(m.connections), COALESCE(MIN(NULLIF(m.min_rtt_us, 0)), 0),
                MAX(m.distance_km), COALESCE(MIN(NULLIF(m.limit_km, 0)), 0), SUM(m.conntrack_bytes),
                SUM(m.unmeasured_flows)
         FROM {LATE_ROWS}
         WHERE m.contested <> 0{filter}
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13
         ON CONFLICT ({column}, node, {CONTESTED_KEY}) DO UPDATE SET
            bytes_sent = {table}.bytes_sent + EXCLUDED.bytes_sent,
            bytes_received = {table}.bytes_received + EXCLUDED.bytes_received,
            connections = {table}.connections + EXCLUDED.connections,
            conntrack_bytes = {table}.conntrack_bytes + EXCLUDED.conntrack_bytes,
            unmeasured_flows = {table}.unmeasured_flows + EXCLUDED.unmeasured_flows,
            min_rtt_us = CASE WHEN {table}.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                              WHEN EXCLUDED.min_rtt_us = 0 THEN {table}.min_rtt_us
                              ELSE LEAST({table}.min_rtt_us, EXCLUDED.min_rtt_us) END,
            limit_km = CASE WHEN {table}.limit_km = 0 THEN EXCLUDED.limit_km
                            WHEN EXCLUDED.limit_km = 0 THEN {table}.limit_km
                            ELSE LEAST({table}.limit_km, EXCLUDED.limit_km) END,
            distance_km = GREATEST({table}.distance_km, EXCLUDED.distance_km),
            org = GREATEST({table}.org, EXCLUDED.org),
            geo_source = GREATEST({table}.geo_source, EXCLUDED.geo_source)"
    )
}

/// Day level: only minutes of days already rolled up (`$8`, the daily rollup's `up_to_ms`).
const DAYS_ROLLED: &str = " AND m.minute_ms < $8";

static LATE_CONTESTED_HOUR_OUT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    late_contested_out(
        "contested_hour",
        "hour_ms",
        crate::store::rollup::HOUR_MS,
        "",
    )
});
static LATE_CONTESTED_HOUR_IN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    late_contested_in(
        "contested_hour",
        "hour_ms",
        crate::store::rollup::HOUR_MS,
        "",
    )
});
static LATE_CONTESTED_DAY_OUT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    late_contested_out(
        "contested_day",
        "day_ms",
        crate::store::rollup::DAY_MS,
        DAYS_ROLLED,
    )
});
static LATE_CONTESTED_DAY_IN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    late_contested_in(
        "contested_day",
        "day_ms",
        crate::store::rollup::DAY_MS,
        DAYS_ROLLED,
    )
});

/// Upsert merged minute rows in one statement.
async fn upsert_minutes(
    tx: &Tx<'_>,
    st: &Statements,
    rows: &[MinuteRow<'_, '_>],
) -> Result<(), StoreError> {
    write_minute_rows(tx, &st.aggregate_flows, rows).await
}

/// `rows` by `statement` ([`AGGREGATE_FLOWS`] or [`INSERT_FLOWS`]: the same parameters).
async fn write_minute_rows(
    tx: &Tx<'_>,
    statement: &Statement,
    rows: &[MinuteRow<'_, '_>],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let none = crate::store::VerdictColumns::default();
    let mut c = MinuteColumns::default();
    for ((node, m, p, proto, dir, addr, rport), e) in rows {
        let v = e.verdict.unwrap_or(&none);
        c.node.push(*node);
        c.minute.push(*m);
        c.pid.push(*p);
        c.process.push(e.process);
        c.protocol.push(*proto);
        c.direction.push(*dir);
        c.remote.push(*addr);
        c.port.push(*rport);
        c.country.push(e.country);
        c.asn.push(e.asn);
        c.org.push(e.org);
        c.geo.push(e.geo_source);
        c.sent.push(e.bytes_sent);
        c.received.push(e.bytes_received);
        c.conns.push(e.connections);
        c.rtt.push(e.min_rtt_us);
        c.answers.push(&*v.answers_json);
        c.contested.push(i64::from(e.contested));
        c.operator.push(e.operator_country);
        c.physics.push(&*v.physics);
        c.distance.push(i64::from(v.distance_km));
        c.limit.push(i64::from(v.limit_km));
        c.conntrack.push(e.conntrack_bytes);
        c.unmeasured.push(e.unmeasured_flows);
    }
    tx.execute(
        statement,
        &[
            &c.node,
            &c.minute,
            &c.pid,
            &c.process,
            &c.protocol,
            &c.direction,
            &c.remote,
            &c.port,
            &c.country,
            &c.asn,
            &c.org,
            &c.geo,
            &c.sent,
            &c.received,
            &c.conns,
            &c.rtt,
            &c.answers,
            &c.contested,
            &c.operator,
            &c.physics,
            &c.distance,
            &c.limit,
            &c.conntrack,
            &c.unmeasured,
        ],
    )
    .await
    .map_err(pg("aggregate flows"))?;
    Ok(())
}

/// The columns of a batch's merged rows, as arrays for `unnest`.
#[derive(Default)]
struct MinuteColumns<'a> {
    node: Vec<&'a str>,
    minute: Vec<i64>,
    pid: Vec<i64>,
    process: Vec<&'a str>,
    protocol: Vec<&'static str>,
    direction: Vec<&'static str>,
    remote: Vec<&'a str>,
    port: Vec<i64>,
    country: Vec<&'a str>,
    asn: Vec<i64>,
    org: Vec<&'a str>,
    geo: Vec<&'a str>,
    sent: Vec<i64>,
    received: Vec<i64>,
    conns: Vec<i64>,
    rtt: Vec<i64>,
    answers: Vec<&'a str>,
    contested: Vec<i64>,
    operator: Vec<&'a str>,
    physics: Vec<&'a str>,
    distance: Vec<i64>,
    limit: Vec<i64>,
    conntrack: Vec<i64>,
    unmeasured: Vec<i64>,
}

/// Keep the batch's flows to destinations outside each node's declared country raw, one row
/// per report ([`crate::store::minutes::foreign_flows`]), in one statement.
pub(super) async fn keep_raw_flows(
    tx: &Tx<'_>,
    st: &Statements,
    reports: &[&IncomingReport],
) -> Result<(), StoreError> {
    let (mut node, mut epoch, mut seq, mut start) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut end, mut count, mut countries, mut flows) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in reports {
        let Some(f) = crate::store::minutes::foreign_flows(r) else {
            continue;
        };
        node.push(r.node.as_str());
        epoch.push(to_i64(r.epoch, "epoch")?);
        seq.push(to_i64(r.seq, "seq")?);
        start.push(f.start_ms);
        end.push(f.end_ms);
        count.push(f.flow_count);
        countries.push(f.countries);
        flows.push(f.flows);
    }
    if node.is_empty() {
        return Ok(());
    }
    tx.execute(
        &st.keep_raw_flows,
        &[
            &node, &epoch, &seq, &start, &end, &count, &countries, &flows,
        ],
    )
    .await
    .map_err(pg("keep raw flows"))?;
    Ok(())
}

/// Apply a report's weight inventory: upsert what it carries, mark what went away.
pub(super) async fn apply_weights(
    tx: &Tx<'_>,
    st: &Statements,
    r: &IncomingReport,
) -> Result<(), StoreError> {
    let w = &r.telemetry.weights;
    if w.is_empty() {
        return Ok(());
    }
    let at = r.received_unix_ms;
    for f in &w.files {
        let id = f.identity.clone().unwrap_or_default();
        let storage = f.storage.clone().unwrap_or_default();
        // Device and inode numbers are identifiers: keep their bits (as SQLite does).
        #[allow(clippy::cast_possible_wrap)]
        let (device, inode) = (f.device as i64, f.inode as i64);
        tx.execute(
            &st.upsert_weight,
            &[
                &r.node,
                &f.path,
                &format_name(f.format),
                &to_i64(f.size_bytes, "weight size")?,
                &f.mtime_unix_ms,
                &device,
                &inode,
                &f.sha256,
                &id.model,
                &id.revision,
                &id.repo_path,
                &id.source,
                &id.publisher,
                &to_i64(f.parameter_count, "parameter_count")?,
                &storage.mount_point,
                &storage.fs_type,
                &storage.network,
                &storage.server_address,
                &crate::store::users_json(f),
                &prost::Message::encode_to_vec(f),
                &at,
            ],
        )
        .await
        .map_err(pg("upsert weight file"))?;
    }
    for path in &w.removed {
        tx.execute(&st.remove_weight, &[&r.node, path, &at])
            .await
            .map_err(pg("mark weight file removed"))?;
    }
    if let Some(chunk) = &w.chunk {
        // A generation (one chunk or several) removes what none of its chunks names, the
        // paths it withheld included.
        apply_generation(tx, r, chunk).await?;
    } else if w.full && !w.withheld_unnamed {
        tx.execute(&st.remove_unlisted_weights, &[&r.node, &at])
            .await
            .map_err(pg("mark unlisted weight files removed"))?;
        // What the report withheld is still there.
        for path in &w.withheld_paths {
            tx.execute(
                "UPDATE weight_files SET removed_ms = NULL WHERE node = $1 AND path = $2 AND removed_ms = $3",
                &[&r.node, path, &at],
            )
            .await
            .map_err(pg("keep withheld weight files"))?;
        }
    }
    Ok(())
}

/// One chunk of a full inventory ([`crate::store::generations`]).
async fn apply_generation(
    tx: &Tx<'_>,
    r: &IncomingReport,
    chunk: &sov_proto::pb::InventoryChunk,
) -> Result<(), StoreError> {
    use crate::store::generations as g;
    let w = &r.telemetry.weights;
    let at = r.received_unix_ms;
    let node = &r.node;
    let epoch = to_i64(r.epoch, "epoch")?;
    let generation = to_i64(chunk.generation, "weight_inventory.generation")?;
    let applied = tx
        .query_opt(g::APPLIED, &[node])
        .await
        .map_err(pg("read applied inventory generation"))?;
    if let Some(row) = applied {
        let a: (i64, i64) = (
            get(&row, 0, "read applied inventory generation")?,
            get(&row, 1, "read applied inventory generation")?,
        );
        if a >= (epoch, generation) {
            return Ok(());
        }
    }
    let count = chunk.last.then(|| i64::from(chunk.index) + 1);
    let unnamed = i64::from(w.withheld_unnamed);
    tx.execute(
        g::NOTE_GENERATION,
        &[node, &epoch, &generation, &count, &unnamed, &at],
    )
    .await
    .map_err(pg("note inventory generation"))?;
    tx.execute(
        g::NOTE_CHUNK,
        &[node, &epoch, &generation, &i64::from(chunk.index)],
    )
    .await
    .map_err(pg("note inventory chunk"))?;
    for path in w.files.iter().map(|f| &f.path).chain(&w.withheld_paths) {
        tx.execute(g::NOTE_PATH, &[node, &epoch, &generation, path])
            .await
            .map_err(pg("note inventory path"))?;
    }
    let row = tx
        .query_one(g::STATE, &[node, &epoch, &generation])
        .await
        .map_err(pg("read inventory generation"))?;
    let what = "read inventory generation";
    let (count, held, unnamed, started): (Option<i64>, i64, i64, i64) = (
        get(&row, 0, what)?,
        get(&row, 1, what)?,
        get(&row, 2, what)?,
        get(&row, 3, what)?,
    );
    let (forget_epoch, forget_generation) = if count == Some(held) {
        if unnamed == 0 {
            tx.execute(
                g::REMOVE_UNNAMED_BY_GENERATION,
                &[&at, node, &started, &epoch, &generation],
            )
            .await
            .map_err(pg("mark files outside the inventory removed"))?;
        }
        tx.execute(g::SET_APPLIED, &[node, &epoch, &generation])
            .await
            .map_err(pg("note applied inventory generation"))?;
        (epoch, generation)
    } else {
        (-1_i64, -1_i64)
    };
    let cutoff = at.saturating_sub(g::ABANDONED_AFTER_MS);
    for stmt in g::FORGET {
        tx.execute(stmt, &[node, &forget_epoch, &forget_generation, &cutoff])
            .await
            .map_err(pg("forget inventory generations"))?;
    }
    Ok(())
}

/// One report in its own transaction, retried when it loses a race with another replica.
pub(super) async fn ingest_with_retries(
    w: &mut Writer,
    report: &IncomingReport,
) -> Result<IngestOutcome, StoreError> {
    let mut attempt = 1;
    loop {
        match ingest_once(w, report).await {
            Err(e) if attempt < INGEST_ATTEMPTS && retryable(&e) => {
                tracing::debug!(node = %report.node, attempt, error = %e, "ingest lost a race; retrying");
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// One ingest transaction.
pub(super) async fn ingest_once(
    w: &mut Writer,
    r: &IncomingReport,
) -> Result<IngestOutcome, StoreError> {
    let Writer { client, st, .. } = w;
    let tx = client.transaction().await.map_err(pg("begin"))?;
    let outcome = apply_report(&tx, st, r).await?;
    tx.commit().await.map_err(pg("commit"))?;
    Ok(outcome)
}

/// Several reports in one transaction (one commit). Sorted by key first, so that replicas
/// committing batches take row locks in the same order (no deadlock between them) and a key
/// queued twice is stored once, then seen as a duplicate.
///
/// One statement per table for the whole batch, not one per report and table: the keys and
/// bodies (`unnest`, `RETURNING` the keys stored), then, pipelined (one round trip), each
/// (node, epoch)'s counters, each node's facts, the gaps and the derive queue rows of the
/// reports stored, and the duplicates' reads. Each statement's rows are what the report-by-
/// report upserts, in key order, left ([`append_groups`]).
pub(super) async fn ingest_batch_once(
    w: &mut Writer,
    reports: &[&IncomingReport],
) -> Result<Vec<IngestOutcome>, StoreError> {
    let mut order: Vec<usize> = (0..reports.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (reports[a], reports[b]);
        (&x.node, x.epoch, x.seq).cmp(&(&y.node, y.epoch, y.seq))
    });
    let sorted: Vec<&IncomingReport> = order.iter().map(|&i| reports[i]).collect();
    let mut keys = AppendKeys::default();
    for r in &sorted {
        keys.node.push(r.node.as_str());
        keys.epoch.push(to_i64(r.epoch, "epoch")?);
        keys.seq.push(to_i64(r.seq, "seq")?);
        keys.observed.push(r.observed_unix_ms);
        keys.received.push(r.received_unix_ms);
        keys.body.push(r.body.as_slice());
    }
    let Writer { client, st, .. } = w;
    let tx = client.transaction().await.map_err(pg("begin batch"))?;
    let stored_keys: std::collections::HashSet<(String, i64, i64)> = tx
        .query(
            &st.append_reports,
            &[
                &keys.node,
                &keys.epoch,
                &keys.seq,
                &keys.observed,
                &keys.received,
                &keys.body,
            ],
        )
        .await
        .map_err(pg("insert reports"))?
        .iter()
        .map(|row| {
            Ok((
                get::<String>(row, 0, "insert reports")?,
                get::<i64>(row, 1, "insert reports")?,
                get::<i64>(row, 2, "insert reports")?,
            ))
        })
        .collect::<Result<_, StoreError>>()?;
    // A key twice in the batch: the first (in `unnest` order) was stored, the other is a
    // duplicate of it.
    let mut seen = std::collections::HashSet::new();
    let stored: Vec<bool> = (0..sorted.len())
        .map(|i| {
            let key = (keys.node[i], keys.epoch[i], keys.seq[i]);
            seen.insert(key) && stored_keys.contains(&(key.0.to_owned(), key.1, key.2))
        })
        .collect();
    let g = append_groups(&sorted, &stored)?;
    let labels: Vec<String> = g
        .nodes
        .iter()
        .map(|&(w, ..)| {
            serde_json::to_string(&sorted[w].labels).unwrap_or_else(|_| "{}".to_owned())
        })
        .collect();
    let mut n = NodeColumns::default();
    for (&(w, first_seen, last_seen, latest_epoch), labels) in g.nodes.iter().zip(&labels) {
        let r = sorted[w];
        n.node.push(r.node.as_str());
        n.site.push(r.site.as_str());
        n.country.push(r.country.as_str());
        n.hostname.push(r.hostname.as_str());
        n.agent_version.push(r.agent_version.as_str());
        n.labels.push(labels.as_str());
        n.first_seen.push(first_seen);
        n.last_seen.push(last_seen);
        n.observed.push(r.observed_unix_ms);
        n.epoch.push(latest_epoch);
        n.cpu.push(f64::from(r.cpu_percent));
        n.used
            .push(to_i64(r.memory_used_bytes, "memory_used_bytes")?);
        n.total
            .push(to_i64(r.memory_total_bytes, "memory_total_bytes")?);
    }
    let mut q = QueueColumns::default();
    let mut gaps = GapColumns::default();
    for (i, r) in sorted.iter().enumerate().filter(|(i, _)| stored[*i]) {
        q.node.push(r.node.as_str());
        q.epoch.push(keys.epoch[i]);
        q.seq.push(keys.seq[i]);
        q.received.push(r.received_unix_ms);
        for gap in &r.gaps {
            gaps.node.push(r.node.as_str());
            gaps.epoch.push(keys.epoch[i]);
            gaps.first.push(to_i64(gap.first_seq, "gap first_seq")?);
            gaps.last.push(to_i64(gap.last_seq, "gap last_seq")?);
            gaps.reason.push(gap.reason.as_str());
            gaps.dropped.push(gap.dropped_unix_ms);
            gaps.received.push(r.received_unix_ms);
        }
    }
    let e = &g.epochs;
    type Param<'p> = &'p (dyn tokio_postgres::types::ToSql + Sync);
    let epoch_params: [Param<'_>; 6] = [
        &e.node,
        &e.epoch,
        &e.reports,
        &e.last_seq,
        &e.first_seen,
        &e.last_seen,
    ];
    let node_params: [Param<'_>; 13] = [
        &n.node,
        &n.site,
        &n.country,
        &n.hostname,
        &n.agent_version,
        &n.labels,
        &n.first_seen,
        &n.last_seen,
        &n.observed,
        &n.epoch,
        &n.cpu,
        &n.used,
        &n.total,
    ];
    let gap_params: [Param<'_>; 7] = [
        &gaps.node,
        &gaps.epoch,
        &gaps.first,
        &gaps.last,
        &gaps.reason,
        &gaps.dropped,
        &gaps.received,
    ];
    let queue_params: [Param<'_>; 4] = [&q.node, &q.epoch, &q.seq, &q.received];
    let epochs = execute_rows(
        &tx,
        &st.append_epochs,
        e.node.len(),
        &epoch_params,
        "update epoch counters",
    );
    let nodes = execute_rows(
        &tx,
        &st.append_nodes,
        n.node.len(),
        &node_params,
        "update nodes",
    );
    let gap_rows = execute_rows(
        &tx,
        &st.append_gaps,
        gaps.node.len(),
        &gap_params,
        "insert gaps",
    );
    let queue = execute_rows(
        &tx,
        &st.append_queue,
        q.node.len(),
        &queue_params,
        "queue for derivation",
    );
    // The duplicates, report by report (rare): a re-send, or a sequence number reused.
    let duplicates = futures::future::try_join_all(
        sorted
            .iter()
            .zip(&stored)
            .filter(|(_, s)| !**s)
            .map(|(r, _)| finish_report(&tx, st, r, 0)),
    );
    let (_, _, _, _, dups) = futures::try_join!(epochs, nodes, gap_rows, queue, duplicates)?;
    tx.commit().await.map_err(pg("commit batch"))?;
    let mut dups = dups.into_iter();
    let mut outcomes = vec![IngestOutcome::Duplicate; reports.len()];
    for (&i, s) in order.iter().zip(&stored) {
        outcomes[i] = if *s {
            IngestOutcome::Stored
        } else {
            dups.next().unwrap_or(IngestOutcome::Duplicate)
        };
    }
    Ok(outcomes)
}

/// One of an append batch's pipelined statements over `rows` rows of column arrays (`params`):
/// nothing is sent when the batch has none.
async fn execute_rows(
    tx: &Tx<'_>,
    statement: &tokio_postgres::Statement,
    rows: usize,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    context: &'static str,
) -> Result<u64, StoreError> {
    if rows == 0 {
        return Ok(0);
    }
    tx.execute(statement, params).await.map_err(pg(context))
}

/// A batch's keys and bodies, as arrays for `unnest` (key order).
#[derive(Default)]
struct AppendKeys<'a> {
    node: Vec<&'a str>,
    epoch: Vec<i64>,
    seq: Vec<i64>,
    observed: Vec<i64>,
    received: Vec<i64>,
    body: Vec<&'a [u8]>,
}

/// One `node_epochs` row per (node, epoch) of the stored reports.
#[derive(Default, Debug, PartialEq, Eq)]
struct EpochColumns<'a> {
    node: Vec<&'a str>,
    epoch: Vec<i64>,
    reports: Vec<i64>,
    last_seq: Vec<i64>,
    first_seen: Vec<i64>,
    last_seen: Vec<i64>,
}

#[derive(Default)]
struct NodeColumns<'a> {
    node: Vec<&'a str>,
    site: Vec<&'a str>,
    country: Vec<&'a str>,
    hostname: Vec<&'a str>,
    agent_version: Vec<&'a str>,
    labels: Vec<&'a str>,
    first_seen: Vec<i64>,
    last_seen: Vec<i64>,
    observed: Vec<i64>,
    epoch: Vec<i64>,
    cpu: Vec<f64>,
    used: Vec<i64>,
    total: Vec<i64>,
}

#[derive(Default)]
struct QueueColumns<'a> {
    node: Vec<&'a str>,
    epoch: Vec<i64>,
    seq: Vec<i64>,
    received: Vec<i64>,
}

#[derive(Default)]
struct GapColumns<'a> {
    node: Vec<&'a str>,
    epoch: Vec<i64>,
    first: Vec<i64>,
    last: Vec<i64>,
    reason: Vec<&'a str>,
    dropped: Vec<i64>,
    received: Vec<i64>,
}

/// What the stored reports of a batch (`sorted` in key order, `stored[i]` when report `i`'s
/// key was inserted) change in `node_epochs` and `nodes`, one row per (node, epoch) and per
/// node: exactly what [`UPSERT_EPOCH`] and [`UPSERT_NODE`] once per report, in key order,
/// would leave.
struct AppendGroups<'a> {
    epochs: EpochColumns<'a>,
    /// Per node: the report whose facts win (the last of those with the latest observation
    /// time: a later report of equal time overwrote an earlier one), the first report's
    /// reception time (the row's `first_seen_ms` when it is new), the latest reception time
    /// and the latest epoch.
    nodes: Vec<(usize, i64, i64, i64)>,
}

fn append_groups<'a>(
    sorted: &[&'a IncomingReport],
    stored: &[bool],
) -> Result<AppendGroups<'a>, StoreError> {
    let mut epochs = EpochColumns::default();
    let mut nodes: Vec<(usize, i64, i64, i64)> = Vec::new();
    let mut last_node: Option<&str> = None;
    for (i, r) in sorted.iter().enumerate().filter(|(i, _)| stored[*i]) {
        let epoch = to_i64(r.epoch, "epoch")?;
        let seq = to_i64(r.seq, "seq")?;
        let at = r.received_unix_ms;
        let same_epoch =
            epochs.node.last() == Some(&r.node.as_str()) && epochs.epoch.last() == Some(&epoch);
        if same_epoch {
            let k = epochs.node.len() - 1;
            epochs.reports[k] += 1;
            epochs.last_seq[k] = epochs.last_seq[k].max(seq);
            epochs.last_seen[k] = epochs.last_seen[k].max(at);
        } else {
            epochs.node.push(r.node.as_str());
            epochs.epoch.push(epoch);
            epochs.reports.push(1);
            epochs.last_seq.push(seq);
            epochs.first_seen.push(at);
            epochs.last_seen.push(at);
        }
        match nodes.last_mut() {
            Some((w, _, last_seen, latest)) if last_node == Some(r.node.as_str()) => {
                if r.observed_unix_ms >= sorted[*w].observed_unix_ms {
                    *w = i;
                }
                *last_seen = (*last_seen).max(at);
                *latest = (*latest).max(epoch);
            }
            _ => {
                nodes.push((i, at, at, epoch));
                last_node = Some(r.node.as_str());
            }
        }
    }
    Ok(AppendGroups { epochs, nodes })
}

/// One report's statements inside `tx` (not committed here).
pub(super) async fn apply_report(
    tx: &Tx<'_>,
    st: &Statements,
    r: &IncomingReport,
) -> Result<IngestOutcome, StoreError> {
    let inserted = insert_report(tx, st, r).await?;
    finish_report(tx, st, r, inserted).await
}

/// Insert the report's key and body; 0 when the key was already stored. Another replica
/// inserting the same key makes this wait for its commit, then insert nothing: exactly one of
/// them stores the report.
pub(super) async fn insert_report(
    tx: &Tx<'_>,
    st: &Statements,
    r: &IncomingReport,
) -> Result<u64, StoreError> {
    let epoch = to_i64(r.epoch, "epoch")?;
    let seq = to_i64(r.seq, "seq")?;
    tx.execute(
        &st.insert_report,
        &[
            &r.node,
            &epoch,
            &seq,
            &r.observed_unix_ms,
            &r.received_unix_ms,
            &r.body,
        ],
    )
    .await
    .map_err(pg("insert report"))
}

/// The rest of a report after [`insert_report`] inserted `inserted` rows: a duplicate or a
/// conflict when 0, else its counters, node facts, gaps, telemetry, weights and flows.
pub(super) async fn finish_report(
    tx: &Tx<'_>,
    st: &Statements,
    r: &IncomingReport,
    inserted: u64,
) -> Result<IngestOutcome, StoreError> {
    let epoch = to_i64(r.epoch, "epoch")?;
    let seq = to_i64(r.seq, "seq")?;
    if inserted == 0 {
        // Already stored. A re-send carries the same observation time; a different one
        // means the agent reused a sequence number (a lost spool state): count it so that
        // it is visible, and keep the first report.
        let stored_ms: i64 = get(
            &tx.query_one(&st.read_duplicate, &[&r.node, &epoch, &seq])
                .await
                .map_err(pg("read duplicate"))?,
            0,
            "read duplicate",
        )?;
        if stored_ms != r.observed_unix_ms {
            tracing::error!(node = %r.node, epoch = r.epoch, seq = r.seq, "sequence number reused for a different report");
            tx.execute(&st.count_conflict, &[&r.node, &epoch])
                .await
                .map_err(pg("count conflict"))?;
            return Ok(IngestOutcome::Conflict);
        }
        return Ok(IngestOutcome::Duplicate);
    }
    tx.execute(
        &st.upsert_epoch,
        &[&r.node, &epoch, &seq, &r.received_unix_ms],
    )
    .await
    .map_err(pg("update epoch counters"))?;
    let labels = serde_json::to_string(&r.labels).unwrap_or_else(|_| "{}".to_owned());
    tx.execute(
        &st.upsert_node,
        &[
            &r.node,
            &r.site,
            &r.country,
            &r.hostname,
            &r.agent_version,
            &labels,
            &r.received_unix_ms,
            &r.observed_unix_ms,
            &epoch,
            &f64::from(r.cpu_percent),
            &to_i64(r.memory_used_bytes, "memory_used_bytes")?,
            &to_i64(r.memory_total_bytes, "memory_total_bytes")?,
        ],
    )
    .await
    .map_err(pg("update node"))?;
    for g in &r.gaps {
        tx.execute(
            &st.insert_gap,
            &[
                &r.node,
                &epoch,
                &to_i64(g.first_seq, "gap first_seq")?,
                &to_i64(g.last_seq, "gap last_seq")?,
                &g.reason,
                &g.dropped_unix_ms,
                &r.received_unix_ms,
            ],
        )
        .await
        .map_err(pg("insert gap"))?;
    }
    tx.execute(&st.enqueue, &[&r.node, &epoch, &seq, &r.received_unix_ms])
        .await
        .map_err(pg("queue for derivation"))?;
    Ok(IngestOutcome::Stored)
}

/// The oldest reports waiting in the partitions of the derive queue this replica holds (see
/// [`super::partitions`]; balanced first when due), with their bodies; read on the deriver's
/// connection, which holds the partitions.
pub(super) async fn underived(
    store: &PostgresStore,
    limit: u32,
) -> Result<Vec<Underived>, StoreError> {
    let mut w = store.deriver().await?;
    let Writer { client, parts, .. } = &mut *w;
    super::partitions::balance(client, parts, false).await?;
    if parts.held.is_empty() {
        return Ok(Vec::new());
    }
    let rows = if parts.holds_all() {
        client
            .query(
                "SELECT q.id, q.node, q.epoch, q.seq, q.received_ms, r.body
                 FROM derive_queue q JOIN reports r
                   ON r.node = q.node AND r.epoch = q.epoch AND r.seq = q.seq
                 ORDER BY q.id LIMIT $1",
                &[&i64::from(limit)],
            )
            .await
    } else {
        client
            .query(
                "SELECT q.id, q.node, q.epoch, q.seq, q.received_ms, r.body
                 FROM derive_queue q JOIN reports r
                   ON r.node = q.node AND r.epoch = q.epoch AND r.seq = q.seq
                 WHERE q.part = ANY($2::INT4[])
                 ORDER BY q.id LIMIT $1",
                &[&i64::from(limit), &parts.held],
            )
            .await
    }
    .map_err(pg("read underived"))?;
    underived_rows(&rows)
}

fn underived_rows(rows: &[tokio_postgres::Row]) -> Result<Vec<Underived>, StoreError> {
    rows.iter()
        .map(|row| {
            Ok(Underived {
                queue_id: get(row, 0, "read underived")?,
                node: get(row, 1, "read underived")?,
                epoch: get_u64(row, 2, "read underived")?,
                seq: get_u64(row, 3, "read underived")?,
                received_unix_ms: get(row, 4, "read underived")?,
                body: get(row, 5, "read underived")?,
            })
        })
        .collect()
}

/// [`crate::store::Store::underived_of`]: `nodes`' waiting reports in the partitions this
/// deriver holds (no balance here: [`underived`] does that), on the deriver's connection.
pub(super) async fn underived_of(
    store: &PostgresStore,
    nodes: &[String],
    limit: u32,
) -> Result<Vec<Underived>, StoreError> {
    if nodes.is_empty() {
        return Ok(Vec::new());
    }
    let w = store.deriver().await?;
    if w.parts.held.is_empty() {
        return Ok(Vec::new());
    }
    let rows = w
        .client
        .query(
            "SELECT q.id, q.node, q.epoch, q.seq, q.received_ms, r.body
             FROM derive_queue q JOIN reports r
               ON r.node = q.node AND r.epoch = q.epoch AND r.seq = q.seq
             WHERE q.node = ANY($2::TEXT[]) AND q.part = ANY($3::INT4[])
             ORDER BY q.id LIMIT $1",
            &[&i64::from(limit), &nodes, &w.parts.held],
        )
        .await
        .map_err(pg("read underived of nodes"))?;
    underived_rows(&rows)
}

/// Derive a batch in one transaction on the deriver's connection: take the batch's queue
/// rows (a row another replica took and committed is gone, one it holds makes this wait for
/// its commit), then derive the reports whose rows this transaction took, in queue order.
/// Retried when it loses a deadlock race.
pub(super) async fn derive(
    store: &PostgresStore,
    batch: Vec<Derivation>,
) -> Result<u64, StoreError> {
    let mut w = store.deriver().await?;
    let mut attempt = 1;
    loop {
        match derive_once(&mut w, &batch).await {
            Err(e) if attempt < INGEST_ATTEMPTS && retryable(&e) => {
                tracing::debug!(attempt, error = %e, "derivation lost a race; retrying");
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

async fn derive_once(w: &mut Writer, batch: &[Derivation]) -> Result<u64, StoreError> {
    let Writer { client, st, parts } = w;
    let tx = client.transaction().await.map_err(pg("begin derive"))?;
    // The commit does not wait for the WAL flush: a crash of the server can lose this
    // transaction only whole, with its queue deletions, so the batch is derived again, never
    // twice (acknowledged reports were committed by ingest, synchronously).
    tx.batch_execute("SET LOCAL synchronous_commit = off")
        .await
        .map_err(pg("relax derive commit"))?;
    let ids: Vec<i64> = batch.iter().map(|d| d.queue_id).collect();
    let taken: std::collections::HashSet<i64> = tx
        .query(&st.take_queued, &[&ids])
        .await
        .map_err(pg("take from derive queue"))?
        .iter()
        .map(|row| get::<i64>(row, 0, "take from derive queue"))
        .collect::<Result<_, _>>()?;
    let mine: Vec<&IncomingReport> = batch
        .iter()
        .filter(|d| taken.contains(&d.queue_id))
        .map(|d| &d.report)
        .collect();
    // One statement per table for the whole batch; what is rare and order-dependent within
    // a node (weight inventories, training runs, container rows) report by report, in order.
    write_samples(&tx, st, &mine).await?;
    for r in &mine {
        apply_weights(&tx, st, r).await?;
        super::training::apply_training(&tx, r).await?;
        super::containers::apply_containers(&tx, r).await?;
    }
    keep_raw_flows(&tx, st, &mine).await?;
    let mut sums = std::collections::BTreeMap::new();
    for r in &mine {
        crate::store::minutes::add_report(&mut sums, r)?;
    }
    let collided = write_minutes(&tx, st, &sums, &parts.newest_minutes).await?;
    // Last: the node rows that ingest also updates are locked for the shortest time.
    update_node_gpus(&tx, st, &mine).await?;
    let derived = u64::try_from(mine.len()).unwrap_or(u64::MAX);
    tx.commit().await.map_err(pg("commit derive"))?;
    if collided {
        parts.newest_minutes.clear();
    }
    parts
        .newest_minutes
        .committed(sums.keys().map(|k| (k.0, k.1)));
    Ok(derived)
}

impl PostgresStore {
    pub(super) fn pending(&self) -> std::sync::MutexGuard<'_, crate::store::Pending> {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The group commit's one drainer: store queued reports until the queue is empty, each
    /// batch in one transaction; a batch that fails is stored report by report (each retried
    /// when it loses a race with another replica), so one bad report fails alone. Should it
    /// panic, the reports waiting are failed and the next push starts another drainer.
    pub(super) async fn drain(&self) {
        struct Stop<'a>(&'a PostgresStore);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    drop(self.0.pending().take_all_and_stop());
                }
            }
        }
        let _stop = Stop(self);
        loop {
            // The writer is taken for each batch, not for the whole drain: under a sustained
            // load the queue never empties, and a drainer that kept the writer until it did
            // starved everything else that writes through it (the rules and alert leases,
            // breaches): on PostgreSQL under `bench_breach_latency --load-agents 200` the rules
            // lease lapsed and no alert came within 30 s. The writer's lock is fair, so those
            // writes now wait for one batch at most.
            let mut w = match self.writer().await {
                Ok(w) => w,
                Err(e) => {
                    // Every waiting report would need this writer: fail them all with the reason.
                    let batch = self.pending().take_all_and_stop();
                    let msg = e.to_string();
                    let outcomes = batch
                        .iter()
                        .map(|_| Err(StoreError::Task(msg.clone())))
                        .collect();
                    crate::store::answer(batch, outcomes);
                    return;
                }
            };
            let batch = self.pending().take_batch_or_stop();
            if batch.is_empty() {
                return;
            }
            let reports: Vec<&IncomingReport> = batch.iter().map(|q| &q.report).collect();
            let together = if reports.len() > 1 {
                match ingest_batch_once(&mut w, &reports).await {
                    Ok(outcomes) => Some(outcomes.into_iter().map(Ok).collect()),
                    Err(e) => {
                        tracing::debug!(reports = reports.len(), error = %e, "batch failed; storing its reports one by one");
                        None
                    }
                }
            } else {
                None
            };
            let outcomes = match together {
                Some(o) => o,
                None => {
                    let mut out = Vec::with_capacity(reports.len());
                    for r in &reports {
                        out.push(ingest_with_retries(&mut w, r).await);
                    }
                    out
                }
            };
            crate::store::answer(batch, outcomes);
        }
    }
}

/// Group commit: the report joins the queue; the one drainer ([`PostgresStore::drain`], started
/// by the push that found none running) stores every queued report (up to
/// [`crate::store::MAX_BATCH_REPORTS`] per transaction) with one commit, then answers each. The
/// drainer runs in a task of its own, so a caller that goes away cannot abort the batch others
/// wait on.
pub(super) async fn ingest(
    store: &PostgresStore,
    report: IncomingReport,
) -> Result<IngestOutcome, StoreError> {
    let (done, start) = store.pending().push(report);
    if start {
        let store = store.clone();
        drop(tokio::spawn(async move { store.drain().await }));
    }
    done.await
        .map_err(|_| StoreError::Task("ingest answer lost".to_owned()))?
}

pub(super) async fn note_peer(store: &PostgresStore, peer: NodePeer) -> Result<(), StoreError> {
    let w = store.writer().await?;
    w.client
        .execute(
            "INSERT INTO node_peers (node, address, country, asn, source, seen_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (node) DO UPDATE SET address = excluded.address, country = excluded.country,
                 asn = excluded.asn, source = excluded.source, seen_ms = excluded.seen_ms
             WHERE excluded.seen_ms >= node_peers.seen_ms",
            &[
                &peer.node,
                &peer.address,
                &peer.country,
                &i64::from(peer.asn),
                &peer.source,
                &peer.seen_unix_ms,
            ],
        )
        .await
        .map_err(pg("record node peer"))?;
    Ok(())
}

/// A second deriver's handle ([`PostgresStore::another_deriver`]).
pub(super) fn another_deriver(
    store: &PostgresStore,
) -> Option<std::sync::Arc<dyn crate::store::Store>> {
    Some(std::sync::Arc::new(store.another_deriver()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_minutes_are_inserted_plainly_with_the_upserts_columns() {
        assert!(AGGREGATE_FLOWS.contains("ON CONFLICT"));
        assert!(!INSERT_FLOWS.contains("ON CONFLICT"), "{}", *INSERT_FLOWS);
        assert!(AGGREGATE_FLOWS.starts_with(INSERT_FLOWS.as_str()));
        assert!(INSERT_FLOWS.trim_end().ends_with("$24::BIGINT[])"));
    }

    #[test]
    fn a_minute_is_new_only_past_its_nodes_newest_committed_one() {
        let mut newest = NewestMinutes::default();
        assert!(!newest.is_new("n", 60_000), "unknown node: upserted");
        newest.committed([("n", 60_000), ("n", 120_000), ("m", 60_000)].into_iter());
        assert!(!newest.is_new("n", 120_000));
        assert!(!newest.is_new("n", 60_000));
        assert!(newest.is_new("n", 180_000));
        assert!(newest.is_new("m", 120_000));
        newest.committed([("n", 60_000)].into_iter());
        assert!(
            !newest.is_new("n", 120_000),
            "an older minute does not lower it"
        );
        newest.clear();
        assert!(!newest.is_new("n", 180_000));
    }
}
