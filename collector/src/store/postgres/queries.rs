//! What regulators read: nodes, models, egress, missing sequence ranges, GPU usage, node
//! addresses.

use super::*;

pub(super) const LIST_NODES: &str = r#"SELECT n.node, n.site, n.country, n.hostname, n.agent_version, n.labels,
        n.last_seen_ms, n.latest_epoch, COALESCE(e.reports, 0), COALESCE(e.last_seq, 0),
        (SELECT COUNT(*) FROM node_epochs x WHERE x.node = n.node),
        n.cpu_percent, n.memory_used_bytes, n.memory_total_bytes,
        (SELECT LEAST(COALESCE(SUM(x.conflicts), 0), 9000000000000000000)::BIGINT FROM node_epochs x WHERE x.node = n.node),
        (SELECT COALESCE(SUM(g.last_seq - g.first_seq + 1
            - (SELECT COUNT(*) FROM reports r WHERE r.node = g.node AND r.epoch = g.epoch
                 AND r.seq BETWEEN g.first_seq AND g.last_seq)), 0)::BIGINT
         FROM gaps g WHERE g.node = n.node),
        n.gpu_state, n.gpu_count, n.gpu_util_percent, n.gpu_memory_used_bytes,
        n.gpu_memory_total_bytes,
        (SELECT LEAST(COALESCE(SUM(GREATEST(x.last_seq - x.reports, 0)), 0), 9000000000000000000)::BIGINT
         FROM node_epochs x WHERE x.node = n.node)
 FROM nodes n
 LEFT JOIN node_epochs e ON e.node = n.node AND e.epoch = n.latest_epoch
 WHERE n.node COLLATE "C" > $1::TEXT
 ORDER BY n.node COLLATE "C"
 LIMIT $2::BIGINT"#;

/// Keys compare byte-wise (`COLLATE "C"`), as in SQLite, whatever the database's collation.
/// Only the page's keys are fetched: at most `limit` models, with all their copies.
pub(super) const LIST_MODELS: &str = r#"WITH current AS (
    SELECT w.node, w.path, w.format, w.size_bytes, w.sha256, w.model, w.revision, w.repo_path,
           w.identity_source, w.publisher, w.parameter_count, w.mount_point, w.fs_type, w.network,
           w.server_address, w.users, w.first_seen_ms, w.last_seen_ms, w.detail,
           COALESCE(n.site, '') AS site, COALESCE(n.country, '') AS country,
           COALESCE(o.run_id, '') AS run_id, COALESCE(tr.base_models, '[]') AS run_bases,
           (CASE WHEN w.sha256 <> '' THEN w.model || '|' || w.sha256
                 ELSE w.model || '|~' || w.node || ':' || w.path END) COLLATE "C" AS k
    FROM weight_files w LEFT JOIN nodes n ON n.node = w.node
    LEFT JOIN training_outputs o ON o.node = w.node AND o.path = w.path
    LEFT JOIN training_runs tr ON tr.node = o.node AND tr.run_id = o.run_id
    WHERE w.removed_ms IS NULL
), hits AS (
    SELECT * FROM current
    WHERE k > $1::TEXT
      AND ($2::TEXT = ''
           OR ($3::BOOLEAN AND sha256 = lower($2::TEXT))
           OR (NOT $3::BOOLEAN AND strpos(lower(model), lower($2::TEXT)) > 0))
), page AS (
    SELECT DISTINCT k FROM hits ORDER BY k LIMIT $4::BIGINT
)
SELECT k, node, path, format, size_bytes, sha256, model, revision, repo_path, identity_source,
       publisher, parameter_count, mount_point, fs_type, network, server_address, users,
       first_seen_ms, last_seen_ms, site, country, detail, run_id, run_bases
FROM hits
WHERE k IN (SELECT k FROM page)
ORDER BY k, node COLLATE "C", path COLLATE "C""#;

pub(super) async fn missing_ranges(
    store: &PostgresStore,
    node: &str,
    epoch: u64,
    limit: u32,
) -> Result<Vec<(u64, u64)>, StoreError> {
    let client = store.reader().await?;
    let (node, epoch) = (node.to_owned(), to_i64(epoch, "epoch")?);
    let missing: Option<i64> = match client
        .query_opt(crate::store::EPOCH_MISSING, &[&node, &epoch])
        .await
        .map_err(pg("epoch missing"))?
    {
        Some(r) => Some(get(&r, 0, "epoch missing")?),
        None => None,
    };
    let mut scan = crate::store::HoleScan::new(limit, missing);
    while scan.wants_more() {
        let page = client
            .query(
                crate::store::KEYS_PAGE,
                &[&node, &epoch, &scan.prev, &crate::store::KEYS_PER_PAGE],
            )
            .await
            .map_err(pg("missing ranges"))?
            .iter()
            .map(|r| get::<i64>(r, 0, "read missing range"))
            .collect::<Result<Vec<i64>, StoreError>>()?;
        if !scan.feed(&page) {
            break;
        }
    }
    Ok(scan.ranges)
}

pub(super) async fn gpu_usage(
    store: &PostgresStore,
    since_unix_ms: i64,
    until_unix_ms: i64,
    limit: u32,
) -> Result<Vec<GpuUsageRow>, StoreError> {
    let client = store.reader().await?;
    let plan =
        crate::store::rollup::plan(since_unix_ms, until_unix_ms, rolled_up_to(&*client).await?);
    let mut values = plan.params();
    values.push(i64::from(limit));
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
        .iter()
        .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let rows = client
        .query(
            &crate::store::rollup::gpu_usage_query(&plan, &|i| format!("${i}"), " COLLATE \"C\""),
            &params,
        )
        .await
        .map_err(pg("gpu usage"))?;
    rows.iter().map(rows::gpu_usage).collect()
}

pub(super) async fn reports_by_node(
    store: &PostgresStore,
    since_unix_ms: i64,
    until_unix_ms: i64,
    limit: u32,
) -> Result<Vec<(String, u64)>, StoreError> {
    let client = store.reader().await?;
    let rows = client
        .query(
            "SELECT node, COUNT(*) FROM reports
             WHERE observed_ms >= $1 AND observed_ms < $2
             GROUP BY node ORDER BY node COLLATE \"C\" LIMIT $3",
            &[&since_unix_ms, &until_unix_ms, &i64::from(limit)],
        )
        .await
        .map_err(pg("reports by node"))?;
    rows.iter()
        .map(|r| {
            let node: String = r.try_get(0).map_err(pg("reports by node"))?;
            let n: i64 = r.try_get(1).map_err(pg("reports by node"))?;
            Ok((node, u64::try_from(n).unwrap_or(0)))
        })
        .collect()
}

pub(super) async fn list_nodes(
    store: &PostgresStore,
    after: &str,
    limit: u32,
) -> Result<Vec<NodeRow>, StoreError> {
    let client = store.reader().await?;
    let rows = client
        .query(LIST_NODES, &[&after, &i64::from(limit)])
        .await
        .map_err(pg("list nodes"))?;
    rows.iter().map(rows::node).collect()
}

pub(super) async fn list_models(
    store: &PostgresStore,
    query: &str,
    after: &str,
    limit: u32,
) -> Result<Vec<sov_proto::pb::ModelSummary>, StoreError> {
    use sov_proto::pb;
    let sha_query = query.len() == 64 && query.bytes().all(|b| b.is_ascii_hexdigit());
    let client = store.reader().await?;
    let rows = client
        .query(
            LIST_MODELS,
            &[&after, &query, &sha_query, &i64::from(limit)],
        )
        .await
        .map_err(pg("list models"))?;
    let mut out: Vec<pb::ModelSummary> = Vec::new();
    for row in &rows {
        if !rows::push_model(&mut out, row, limit)? {
            break;
        }
    }
    Ok(out)
}

pub(super) async fn model_holdings(
    store: &PostgresStore,
    cap: u32,
) -> Result<(Vec<sov_proto::pb::ModelSummary>, bool), StoreError> {
    use futures::TryStreamExt;
    let client = store.reader().await?;
    // Streamed: a country's copies are hundreds of thousands of rows.
    let rows = client
        .query_raw(crate::store::MODEL_HOLDINGS, std::iter::empty::<i64>())
        .await
        .map_err(pg("model holdings"))?;
    futures::pin_mut!(rows);
    let mut out = std::collections::BTreeMap::new();
    while let Some(row) = rows.try_next().await.map_err(pg("read model holding"))? {
        rows::push_holding(&mut out, &row)?;
    }
    let cut = out.len() > cap as usize;
    Ok((out.into_values().take(cap as usize).collect(), cut))
}

pub(super) async fn egress(
    store: &PostgresStore,
    q: EgressQuery,
) -> Result<(Vec<sov_proto::pb::EgressRow>, u64), StoreError> {
    const NO_TEXT: &str = "''::TEXT";
    const NO_NUM: &str = "0::BIGINT";
    use crate::store::containers;
    let (cols, group): (String, String) = if let Some((cols, group)) =
        containers::egress_grouping(&q.by, NO_TEXT, NO_NUM)
    {
        (cols, group.to_owned())
    } else {
        let (cols, group) = match q.by.as_str() {
        "" | "country" => (
            format!(
                "country, {NO_TEXT}, {NO_TEXT}, {NO_NUM}, {NO_NUM}, {NO_TEXT}, {NO_TEXT}, {NO_NUM}, {NO_TEXT}"
            ),
            "country",
        ),
        "node" => (
            format!(
                "country, node, {NO_TEXT}, {NO_NUM}, {NO_NUM}, {NO_TEXT}, {NO_TEXT}, {NO_NUM}, {NO_TEXT}"
            ),
            "country, node",
        ),
        "process" => (
            format!(
                "country, node, process, pid, {NO_NUM}, {NO_TEXT}, {NO_TEXT}, {NO_NUM}, {NO_TEXT}"
            ),
            "country, node, process, pid",
        ),
        "asn" => (
            format!(
                "country, {NO_TEXT}, {NO_TEXT}, {NO_NUM}, asn, max(org), {NO_TEXT}, {NO_NUM}, {NO_TEXT}"
            ),
            "country, asn",
        ),
        "destination" => (
            format!(
                "country, {NO_TEXT}, {NO_TEXT}, {NO_NUM}, asn, max(org), remote_address, remote_port, max(geo_source)"
            ),
            "country, asn, remote_address, remote_port",
        ),
        "flow" => (
            "country, node, process, pid, asn, max(org), remote_address, remote_port, max(geo_source)"
                .to_owned(),
            "country, node, process, pid, asn, remote_address, remote_port",
        ),
        "verdict" => (
            format!(
                "country, min(node), {NO_TEXT}, {NO_NUM}, asn, max(org), {NO_TEXT}, {NO_NUM}, max(geo_source)"
            ),
            crate::store::rollup::VERDICT_GROUP,
        ),
        "contested" => (
            format!(
                "country, min(node), {NO_TEXT}, {NO_NUM}, asn, max(org), remote_address, remote_port, max(geo_source)"
            ),
            "country, node_site, node_country, asn, remote_address, remote_port",
        ),
        other => {
            return Err(StoreError::Range(format!(
                "unknown grouping {other:?}: use country, node, process, asn, destination, pod, namespace, image, container or flow"
            )));
        }
    };
        let group = if q.by == "flow" {
            format!("{group}, {}", containers::FLOW_CONTAINER_GROUP)
        } else {
            group.to_owned()
        };
        (cols, group)
    };
    // COUNT(*) OVER () is the number of groups before LIMIT; at least one row is fetched
    // so that it is known even when the limit is 0.
    let verdict = crate::store::egress_verdict_select(
        crate::store::rollup::per_destination(&q.by),
        "::BIGINT",
    );
    let containers_select = containers::egress_container_select(&q.by, NO_TEXT);
    // Minutes are stamped at their start: a range starting mid-minute includes it.
    let since = q.since_unix_ms - q.since_unix_ms.rem_euclid(60_000);
    let client = store.reader().await?;
    let plan = if crate::store::rollup::by_hours(&q.by) {
        crate::store::rollup::plan_with_rest(since, q.until_unix_ms, rolled_up_to(&*client).await?)
    } else if q.by == "contested" {
        crate::store::rollup::plan(since, q.until_unix_ms, rolled_up_to(&*client).await?)
    } else {
        crate::store::rollup::Plan::default()
    };
    let fleet = plan.has_rollups() && crate::store::rollup::by_fleet(&q.by);
    let (source, filter, values) = if fleet {
        (
            crate::store::rollup::fleet_source(
                &plan,
                &|i| format!("${i}"),
                NO_TEXT,
                NO_NUM,
                q.by == "verdict",
                false,
                crate::store::rollup::FLOW_COLUMNS,
            ),
            String::new(),
            plan.params(),
        )
    } else if plan.has_rollups() && q.by == "contested" {
        (
            crate::store::rollup::contested_source(&plan, &|i| format!("${i}")),
            String::new(),
            plan.params(),
        )
    } else if plan.has_rollups() {
        (
            crate::store::rollup::flows_source(
                &plan,
                &|i| format!("${i}"),
                NO_TEXT,
                NO_NUM,
                false,
                crate::store::rollup::FLOW_COLUMNS,
            ),
            String::new(),
            plan.params(),
        )
    } else {
        let source = if containers::by_container(&q.by) {
            containers::FLOWS_WITH_CONTAINERS
        } else {
            "flows_minute"
        };
        let contested = if q.by == "contested" {
            " AND contested <> 0"
        } else {
            ""
        };
        (
            source.to_owned(),
            format!(
                "WHERE minute_ms >= $1 AND minute_ms < $2 AND direction <> 'inbound'{contested}"
            ),
            vec![since, q.until_unix_ms],
        )
    };
    let source = if matches!(q.by.as_str(), "verdict" | "contested") && !fleet {
        crate::store::rollup::with_node_site(&source)
    } else {
        source
    };
    let limit_param = values.len() + 1;
    let having = crate::store::plainly_inside_having(&q).unwrap_or_default();
    let text = format!(
        "SELECT {cols}, SUM(bytes_sent)::BIGINT, SUM(bytes_received)::BIGINT,
                SUM(connections)::BIGINT, COALESCE(MIN(NULLIF(min_rtt_us, 0)), 0)::BIGINT,
                {verdict}, {containers_select}, COUNT(*) OVER ()
         FROM {source}
         {filter}
         GROUP BY {group}
         {having}
         ORDER BY SUM(bytes_sent) DESC, SUM(bytes_received) DESC, {group}
         LIMIT GREATEST(${limit_param}::BIGINT, 1)"
    );
    let limit = i64::from(q.limit);
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
        .iter()
        .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    params.push(&limit);
    let rows = client.query(&text, &params).await.map_err(pg("egress"))?;
    const C: &str = "read egress row";
    let total = match rows.first() {
        Some(row) => get_u64(row, rows::EGRESS_COLUMNS, C)?,
        None => 0,
    };
    let out = rows
        .iter()
        .take(q.limit as usize)
        .map(rows::egress)
        .collect::<Result<Vec<_>, StoreError>>()?;
    let truncated = total.saturating_sub(out.len() as u64);
    Ok((out, truncated))
}

pub(super) async fn node_peers(store: &PostgresStore) -> Result<Vec<NodePeer>, StoreError> {
    let client = store.reader().await?;
    let rows = client
        .query(
            "SELECT node, address, country, asn, source, seen_ms FROM node_peers
             ORDER BY node COLLATE \"C\"",
            &[],
        )
        .await
        .map_err(pg("node peers"))?;
    rows.iter().map(rows::peer).collect()
}

pub(super) async fn derive_status(store: &PostgresStore) -> Result<DeriveStatus, StoreError> {
    let client = store.reader().await?;
    let row = client
        .query_one("SELECT COUNT(*), MIN(received_ms) FROM derive_queue", &[])
        .await
        .map_err(pg("read derive status"))?;
    Ok(DeriveStatus {
        pending: get_u64(&row, 0, "read derive status")?,
        oldest_pending_received_unix_ms: get(&row, 1, "read derive status")?,
    })
}

/// Where the hourly and daily rollups have come to (see [`crate::store::rollup`]).
pub(super) async fn rolled_up_to(
    client: &impl tokio_postgres::GenericClient,
) -> Result<crate::store::rollup::UpTo, StoreError> {
    let rows = client
        .query("SELECT name, up_to_ms FROM rollup_state", &[])
        .await
        .map_err(pg("read rollup state"))?;
    let mut up_to = crate::store::rollup::UpTo::default();
    for r in &rows {
        let name: String = get(r, 0, "read rollup state")?;
        let at: i64 = get(r, 1, "read rollup state")?;
        match name.as_str() {
            "hourly" => up_to.hours = at,
            "daily" => up_to.days = at,
            _ => {}
        }
    }
    Ok(up_to)
}
