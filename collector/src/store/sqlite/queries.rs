//! What regulators read: nodes, models, egress, missing sequence ranges, GPU usage, node
//! addresses.

use super::*;

impl SqliteStore {
    pub(super) fn list_nodes_blocking(
        conn: &Connection,
        after: &str,
        limit: u32,
    ) -> Result<Vec<NodeRow>, StoreError> {
        let mut stmt = conn
            .prepare_cached(
                "SELECT n.node, n.site, n.country, n.hostname, n.agent_version, n.labels,
                        n.last_seen_ms, n.latest_epoch, COALESCE(e.reports, 0), COALESCE(e.last_seq, 0),
                        (SELECT COUNT(*) FROM node_epochs x WHERE x.node = n.node),
                        n.cpu_percent, n.memory_used_bytes, n.memory_total_bytes,
                        (SELECT CAST(MIN(TOTAL(x.conflicts), 9.0e18) AS INTEGER) FROM node_epochs x WHERE x.node = n.node),
                        (SELECT COALESCE(SUM(g.last_seq - g.first_seq + 1
                            - (SELECT COUNT(*) FROM reports r WHERE r.node = g.node AND r.epoch = g.epoch
                                 AND r.seq BETWEEN g.first_seq AND g.last_seq)), 0)
                         FROM gaps g WHERE g.node = n.node),
                        n.gpu_state, n.gpu_count, n.gpu_util_percent, n.gpu_memory_used_bytes,
                        n.gpu_memory_total_bytes,
                        (SELECT CAST(MIN(TOTAL(MAX(x.last_seq - x.reports, 0)), 9.0e18) AS INTEGER)
                         FROM node_epochs x WHERE x.node = n.node)
                 FROM nodes n
                 LEFT JOIN node_epochs e ON e.node = n.node AND e.epoch = n.latest_epoch
                 WHERE n.node > ?1
                 ORDER BY n.node
                 LIMIT ?2",
            )
            .map_err(sql("prepare list nodes"))?;
        let mut rows = stmt
            .query(params![after, i64::from(limit)])
            .map_err(sql("list nodes"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql("read node row"))? {
            out.push(rows::node(row)?);
        }
        Ok(out)
    }

    pub(super) fn list_models_blocking(
        conn: &Connection,
        query: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<sov_proto::pb::ModelSummary>, StoreError> {
        use sov_proto::pb;
        let sha_query = query.len() == 64 && query.bytes().all(|b| b.is_ascii_hexdigit());
        let mut stmt = conn
            .prepare_cached(
                "SELECT k, node, path, format, size_bytes, sha256, model, revision, repo_path, identity_source,
                        publisher, parameter_count, mount_point, fs_type, network, server_address, users,
                        first_seen_ms, last_seen_ms, site, country, detail, run_id, run_bases
                 FROM (SELECT w.*, COALESCE(n.site, '') AS site, COALESCE(n.country, '') AS country,
                              COALESCE(o.run_id, '') AS run_id, COALESCE(tr.base_models, '[]') AS run_bases,
                              CASE WHEN w.sha256 <> '' THEN w.model || '|' || w.sha256
                                   ELSE w.model || '|~' || w.node || ':' || w.path END AS k
                       FROM weight_files w LEFT JOIN nodes n ON n.node = w.node
                       LEFT JOIN training_outputs o ON o.node = w.node AND o.path = w.path
                       LEFT JOIN training_runs tr ON tr.node = o.node AND tr.run_id = o.run_id
                       WHERE w.removed_ms IS NULL)
                 WHERE k > ?1
                   AND (?2 = '' OR (?3 AND sha256 = lower(?2)) OR (NOT ?3 AND instr(lower(model), lower(?2)) > 0))
                 ORDER BY k, node, path",
            )
            .map_err(sql("prepare list models"))?;
        let mut rows = stmt
            .query(params![after, query, sha_query])
            .map_err(sql("list models"))?;
        let mut out: Vec<pb::ModelSummary> = Vec::new();
        while let Some(row) = rows.next().map_err(sql("read model row"))? {
            if !rows::push_model(&mut out, row, limit)? {
                break;
            }
        }
        Ok(out)
    }

    pub(super) fn egress_blocking(
        conn: &Connection,
        q: &crate::store::EgressQuery,
    ) -> Result<(Vec<sov_proto::pb::EgressRow>, u64), StoreError> {
        use crate::store::containers;
        let (cols, group): (String, String) = if let Some((cols, group)) =
            containers::egress_grouping(&q.by, "''", "0")
        {
            (cols, group.to_owned())
        } else {
            let (cols, group) = match q.by.as_str() {
                "" | "country" => ("country, '', '', 0, 0, '', '', 0, ''", "country"),
                "node" => ("country, node, '', 0, 0, '', '', 0, ''", "country, node"),
                "process" => (
                    "country, node, process, pid, 0, '', '', 0, ''",
                    "country, node, process, pid",
                ),
                "asn" => (
                    "country, '', '', 0, asn, max(org), '', 0, ''",
                    "country, asn",
                ),
                "destination" => (
                    "country, '', '', 0, asn, max(org), remote_address, remote_port, max(geo_source)",
                    "country, asn, remote_address, remote_port",
                ),
                "flow" => (
                    "country, node, process, pid, asn, max(org), remote_address, remote_port, max(geo_source)",
                    "country, node, process, pid, asn, remote_address, remote_port",
                ),
                "verdict" => (
                    "country, min(node), '', 0, asn, max(org), '', 0, max(geo_source)",
                    crate::store::rollup::VERDICT_GROUP,
                ),
                "contested" => (
                    "country, min(node), '', 0, asn, max(org), remote_address, remote_port, max(geo_source)",
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
            (cols.to_owned(), group)
        };
        let verdict =
            crate::store::egress_verdict_select(crate::store::rollup::per_destination(&q.by), "");
        let containers_select = containers::egress_container_select(&q.by, "''");
        // Minutes are stamped at their start: a range starting mid-minute includes it.
        let since = q.since_unix_ms - q.since_unix_ms.rem_euclid(60_000);
        let plan = if crate::store::rollup::by_hours(&q.by) {
            crate::store::rollup::plan_with_rest(since, q.until_unix_ms, rolled_up_to(conn)?)
        } else if q.by == "contested" {
            crate::store::rollup::plan(since, q.until_unix_ms, rolled_up_to(conn)?)
        } else {
            crate::store::rollup::Plan::default()
        };
        let fleet = plan.has_rollups() && crate::store::rollup::by_fleet(&q.by);
        // Summed here (`group_here`): only the columns it reads.
        let summed = plan.has_rollups()
            && matches!(q.by.as_str(), "node" | "process" | "" | "country" | "asn");
        let source_cols = if summed {
            crate::store::rollup::SUMMED_COLUMNS
        } else {
            crate::store::rollup::FLOW_COLUMNS
        };
        let (source, filter, values) = if fleet {
            let p = |i: usize| format!("?{i}");
            (
                crate::store::rollup::fleet_source(
                    &plan,
                    &p,
                    "''",
                    "0",
                    q.by == "verdict",
                    true,
                    source_cols,
                ),
                String::new(),
                plan.params(),
            )
        } else if plan.has_rollups() && q.by == "contested" {
            let p = |i: usize| format!("?{i}");
            (
                crate::store::rollup::contested_source(&plan, &p),
                String::new(),
                plan.params(),
            )
        } else if plan.has_rollups() {
            let p = |i: usize| format!("?{i}");
            (
                crate::store::rollup::flows_source(&plan, &p, "''", "0", true, source_cols),
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
                    "WHERE minute_ms >= ?1 AND minute_ms < ?2 AND direction <> 'inbound'{contested}"
                ),
                vec![since, q.until_unix_ms],
            )
        };
        if summed {
            return group_here(conn, q, &source, &values);
        }
        if fleet && q.by == "verdict" {
            return verdicts_here(conn, q, &source, &values);
        }
        if plan.has_rollups() && q.by == "contested" {
            return contested_here(conn, q, &source, &values);
        }
        let source = if matches!(q.by.as_str(), "verdict" | "contested") && !fleet {
            crate::store::rollup::with_node_site(&source)
        } else {
            source
        };
        // COUNT(*) OVER () is the number of groups before LIMIT (at least one row is read,
        // so that it is known even when the limit is 0): the groups past the limit are
        // counted, not stepped through (`--by process` at 1,000 nodes has 180,000).
        let limit_param = values.len() + 1;
        let having = crate::store::plainly_inside_having(q).unwrap_or_default();
        let text = format!(
            "SELECT {cols}, SUM(bytes_sent), SUM(bytes_received), SUM(connections),
                    COALESCE(MIN(NULLIF(min_rtt_us, 0)), 0), {verdict}, {containers_select},
                    COUNT(*) OVER ()
             FROM {source}
             {filter}
             GROUP BY {group}
             {having}
             ORDER BY SUM(bytes_sent) DESC, SUM(bytes_received) DESC
             LIMIT max(?{limit_param}, 1)"
        );
        let mut values = values;
        values.push(i64::from(q.limit));
        let mut stmt = conn.prepare_cached(&text).map_err(sql("prepare egress"))?;
        let mut rows = stmt
            .query(rusqlite::params_from_iter(values))
            .map_err(sql("egress"))?;
        let mut out = Vec::new();
        let mut total = 0u64;
        while let Some(row) = rows.next().map_err(sql("read egress row"))? {
            if out.is_empty() {
                let n: i64 = row
                    .get(rows::EGRESS_COLUMNS)
                    .map_err(sql("read egress row"))?;
                total = u64::try_from(n).unwrap_or(0);
            }
            if out.len() < q.limit as usize {
                out.push(rows::egress(row)?);
            }
        }
        let truncated = total.saturating_sub(out.len() as u64);
        Ok((out, truncated))
    }
}

/// Text values interned as small integers: a row's group key is found without allocating.
/// Each column's last value is remembered: rows come in key order (node by node, period by
/// period), so most columns repeat the row before's text and cost one comparison instead of
/// a hash lookup.
/// Hashed with foldhash, not the standard library's SipHash: these maps are built from the
/// collector's own reads (no attacker chooses how many keys collide within one answer), and at
/// 10,000 nodes a question hashes millions of short names.
#[derive(Default)]
struct Names {
    ids: foldhash::HashMap<String, u32>,
    names: Vec<String>,
    /// The id of the last value read from each column.
    last: Vec<Option<u32>>,
}

impl Names {
    /// The id of text column `i` of `row`.
    fn id(&mut self, row: &rusqlite::Row<'_>, i: usize) -> Result<u32, StoreError> {
        let t = row
            .get_ref(i)
            .and_then(|v| v.as_str().map_err(rusqlite::Error::from))
            .map_err(sql("read egress row"))?;
        if let Some(&Some(id)) = self.last.get(i)
            && self.names.get(id as usize).is_some_and(|n| n == t)
        {
            return Ok(id);
        }
        let id = self.intern(t);
        if self.last.len() <= i {
            self.last.resize(i + 1, None);
        }
        self.last[i] = Some(id);
        Ok(id)
    }

    /// The id of `t`, given one if it has none yet.
    fn intern(&mut self, t: &str) -> u32 {
        if let Some(&id) = self.ids.get(t) {
            return id;
        }
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.ids.insert(t.to_owned(), id);
        self.names.push(t.to_owned());
        id
    }

    fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", String::as_str)
    }
}

/// The `limit` first of `groups` in `order`, in that order.
fn largest<T>(
    mut groups: Vec<T>,
    limit: u32,
    order: impl Fn(&T, &T) -> std::cmp::Ordering + Copy,
) -> Vec<T> {
    let limit = limit as usize;
    if groups.len() > limit {
        groups.select_nth_unstable_by(limit, order);
        groups.truncate(limit);
    }
    groups.sort_unstable_by(order);
    groups
}

/// One group of [`group_here`]: sums, and the least non-zero RTT.
#[derive(Default)]
struct Sums {
    sent: u64,
    received: u64,
    connections: u64,
    min_rtt_us: u32,
    conntrack_bytes: u64,
    unmeasured_flows: u64,
}

/// The groupings over rollups grouped here rather than by SQLite: the node-level ones
/// (`node`: country and node; `process`: and process and pid) and the fleet ones (`country`;
/// `asn`: country and ASN, with the greatest organisation name). The rows of `source` (hour,
/// day and rest-of-day rows — fleet rows for `country` and `asn` — and the minutes of the
/// range's ends) are read once in key order and summed in a hash map keyed by interned names.
/// SQLite groups them by sorting every row (a temporary B-tree, spilled to disk past its cache:
/// at 10,000 nodes the tail of a range alone, the two or three minutes since the hourly
/// rollup, is a million minute rows), then counts and sorts the groups again (180,000 for
/// `--by process` at 1,000 nodes). Same answer: the same sums per group, largest `bytes_sent`
/// first (then `bytes_received`, then the group's names, where SQLite left ties in no set
/// order); memory is one entry per group, as SQLite's was.
fn group_here(
    conn: &Connection,
    q: &crate::store::EgressQuery,
    source: &str,
    values: &[i64],
) -> Result<(Vec<sov_proto::pb::EgressRow>, u64), StoreError> {
    let by = q.by.as_str();
    // The key's columns besides the country: node, process, and a number (pid or ASN); and
    // the organisation (`asn` only). Columns a grouping does not have are not read at all:
    // at 10,000 nodes a week is about 7 M rows, and each text column read costs a lookup.
    let (node, process, number, org) = match by {
        "process" => (true, true, Some("pid"), false),
        "node" => (true, false, None, false),
        "asn" => (false, false, Some("asn"), true),
        _ => (false, false, None, false),
    };
    let mut cols = vec!["country"];
    let at = |cols: &mut Vec<&'static str>, on: bool, col: &'static str| {
        on.then(|| {
            cols.push(col);
            cols.len() - 1
        })
    };
    let node_at = at(&mut cols, node, "node");
    let process_at = at(&mut cols, process, "process");
    let number_at = number.and_then(|c| at(&mut cols, true, c));
    let org_at = at(&mut cols, org, "org");
    let sums = cols.len();
    let text = format!(
        "SELECT {}, bytes_sent, bytes_received, connections, min_rtt_us, conntrack_bytes,
                unmeasured_flows
         FROM {source}",
        cols.join(", ")
    );
    let mut stmt = conn.prepare_cached(&text).map_err(sql("prepare egress"))?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(values))
        .map_err(sql("egress"))?;
    const C: &str = "read egress row";
    let mut names = Names::default();
    let empty = names.intern("");
    // Per group: its sums and its greatest organisation name (interned; `asn` only).
    let mut groups: foldhash::HashMap<(u32, u32, u32, i64), (Sums, u32)> =
        foldhash::HashMap::default();
    let count = |row: &rusqlite::Row<'_>, i: usize| -> Result<u64, StoreError> {
        Ok(u64::try_from(row.get::<_, i64>(i).map_err(sql(C))?).unwrap_or(0))
    };
    let text_at = |names: &mut Names, row: &rusqlite::Row<'_>, i: Option<usize>| match i {
        Some(i) => names.id(row, i),
        None => Ok(empty),
    };
    while let Some(row) = rows.next().map_err(sql(C))? {
        let key = (
            names.id(row, 0)?,
            text_at(&mut names, row, node_at)?,
            text_at(&mut names, row, process_at)?,
            match number_at {
                Some(i) => row.get::<_, i64>(i).map_err(sql(C))?,
                None => 0,
            },
        );
        let org = text_at(&mut names, row, org_at)?;
        let (g, max_org) = groups.entry(key).or_insert_with(|| (Sums::default(), org));
        if org != *max_org && names.name(org) > names.name(*max_org) {
            *max_org = org;
        }
        g.sent = g.sent.saturating_add(count(row, sums)?);
        g.received = g.received.saturating_add(count(row, sums + 1)?);
        g.connections = g.connections.saturating_add(count(row, sums + 2)?);
        let rtt = u32::try_from(row.get::<_, i64>(sums + 3).map_err(sql(C))?).unwrap_or(0);
        if rtt != 0 && (g.min_rtt_us == 0 || rtt < g.min_rtt_us) {
            g.min_rtt_us = rtt;
        }
        g.conntrack_bytes = g.conntrack_bytes.saturating_add(count(row, sums + 4)?);
        g.unmeasured_flows = g.unmeasured_flows.saturating_add(count(row, sums + 5)?);
    }
    let total = groups.len() as u64;
    type Group = ((u32, u32, u32, i64), (Sums, u32));
    let groups: Vec<Group> = groups.into_iter().collect();
    let name = |i: u32| names.name(i);
    let order = |a: &Group, b: &Group| {
        (b.1.0.sent, b.1.0.received)
            .cmp(&(a.1.0.sent, a.1.0.received))
            .then_with(|| {
                (name(a.0.0), name(a.0.1), name(a.0.2), a.0.3).cmp(&(
                    name(b.0.0),
                    name(b.0.1),
                    name(b.0.2),
                    b.0.3,
                ))
            })
    };
    let out: Vec<sov_proto::pb::EgressRow> = largest(groups, q.limit, order)
        .into_iter()
        .map(
            |((country, node, process, number), (s, org))| sov_proto::pb::EgressRow {
                country: name(country).to_owned(),
                node: name(node).to_owned(),
                process: name(process).to_owned(),
                pid: if by == "process" {
                    u32::try_from(number).unwrap_or(0)
                } else {
                    0
                },
                asn: if by == "asn" {
                    u32::try_from(number).unwrap_or(0)
                } else {
                    0
                },
                org: name(org).to_owned(),
                bytes_sent: s.sent,
                bytes_received: s.received,
                connections: s.connections,
                min_rtt_us: s.min_rtt_us,
                conntrack_bytes: s.conntrack_bytes,
                unmeasured_flows: s.unmeasured_flows,
                ..Default::default()
            },
        )
        .collect();
    let truncated = total.saturating_sub(out.len() as u64);
    Ok((out, truncated))
}

/// One group of [`verdicts_here`].
#[derive(Default)]
struct Verdict {
    sums: Sums,
    node: Option<u32>,
    org: u32,
    geo_source: u32,
    distance_km: i64,
    limit_km: i64,
}

/// The scorecard's `verdict` grouping over fleet rows (node site and declared country,
/// destination country, ASN and verdict), grouped here for the reason [`group_here`] gives:
/// at 1,000 nodes a month is about 80,000 fleet rows and the tail's 100,000 minute rows,
/// whose keys carry each destination's answers (JSON text) that SQLite's sort compared row
/// by row. The same aggregates as the SQL: sums, the least non-zero RTT and limit, the
/// greatest distance, organisation and source, the least node name.
fn verdicts_here(
    conn: &Connection,
    q: &crate::store::EgressQuery,
    source: &str,
    values: &[i64],
) -> Result<(Vec<sov_proto::pb::EgressRow>, u64), StoreError> {
    const C: &str = "read egress row";
    type Key = (u32, u32, u32, i64, u32, i64, u32, u32);
    let text = format!(
        "SELECT node_site, node_country, country, asn, answers, contested, operator_country,
                physics, node, org, geo_source, bytes_sent, bytes_received, connections,
                min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows
         FROM {source}"
    );
    let mut stmt = conn.prepare_cached(&text).map_err(sql("prepare egress"))?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(values))
        .map_err(sql("egress"))?;
    let mut names = Names::default();
    let mut groups: foldhash::HashMap<Key, Verdict> = foldhash::HashMap::default();
    let int = |row: &rusqlite::Row<'_>, i: usize| row.get::<_, i64>(i).map_err(sql(C));
    let count = |row: &rusqlite::Row<'_>, i: usize| -> Result<u64, StoreError> {
        Ok(u64::try_from(int(row, i)?).unwrap_or(0))
    };
    while let Some(row) = rows.next().map_err(sql(C))? {
        let key = (
            names.id(row, 0)?,
            names.id(row, 1)?,
            names.id(row, 2)?,
            int(row, 3)?,
            names.id(row, 4)?,
            int(row, 5)?,
            names.id(row, 6)?,
            names.id(row, 7)?,
        );
        let (node, org, geo) = (names.id(row, 8)?, names.id(row, 9)?, names.id(row, 10)?);
        let g = groups.entry(key).or_insert_with(|| Verdict {
            org,
            geo_source: geo,
            ..Verdict::default()
        });
        if g.node
            .is_none_or(|n| n != node && names.name(node) < names.name(n))
        {
            g.node = Some(node);
        }
        if org != g.org && names.name(org) > names.name(g.org) {
            g.org = org;
        }
        if geo != g.geo_source && names.name(geo) > names.name(g.geo_source) {
            g.geo_source = geo;
        }
        let s = &mut g.sums;
        s.sent = s.sent.saturating_add(count(row, 11)?);
        s.received = s.received.saturating_add(count(row, 12)?);
        s.connections = s.connections.saturating_add(count(row, 13)?);
        let rtt = u32::try_from(int(row, 14)?).unwrap_or(0);
        if rtt != 0 && (s.min_rtt_us == 0 || rtt < s.min_rtt_us) {
            s.min_rtt_us = rtt;
        }
        g.distance_km = g.distance_km.max(int(row, 15)?);
        let limit = int(row, 16)?;
        if limit != 0 && (g.limit_km == 0 || limit < g.limit_km) {
            g.limit_km = limit;
        }
        s.conntrack_bytes = s.conntrack_bytes.saturating_add(count(row, 17)?);
        s.unmeasured_flows = s.unmeasured_flows.saturating_add(count(row, 18)?);
    }
    let total = groups.len() as u64;
    let groups: Vec<(Key, Verdict)> = groups.into_iter().collect();
    let name = |i: u32| names.name(i);
    let order = |a: &(Key, Verdict), b: &(Key, Verdict)| {
        (b.1.sums.sent, b.1.sums.received)
            .cmp(&(a.1.sums.sent, a.1.sums.received))
            .then_with(|| {
                let k = |k: &Key| {
                    (
                        (name(k.0), name(k.1), name(k.2), k.3),
                        (name(k.4), k.5, name(k.6), name(k.7)),
                    )
                };
                k(&a.0).cmp(&k(&b.0))
            })
    };
    let out: Vec<sov_proto::pb::EgressRow> = largest(groups, q.limit, order)
        .into_iter()
        .map(|(k, g)| sov_proto::pb::EgressRow {
            country: name(k.2).to_owned(),
            node: g.node.map(name).unwrap_or_default().to_owned(),
            asn: u32::try_from(k.3).unwrap_or(0),
            org: name(g.org).to_owned(),
            geo_source: name(g.geo_source).to_owned(),
            bytes_sent: g.sums.sent,
            bytes_received: g.sums.received,
            connections: g.sums.connections,
            min_rtt_us: g.sums.min_rtt_us,
            answers: crate::store::rows::answers(name(k.4)),
            contested: k.5 != 0,
            operator_country: name(k.6).to_owned(),
            physics: name(k.7).to_owned(),
            distance_km: u32::try_from(g.distance_km).unwrap_or(0),
            limit_km: u32::try_from(g.limit_km).unwrap_or(0),
            conntrack_bytes: g.sums.conntrack_bytes,
            unmeasured_flows: g.sums.unmeasured_flows,
            ..Default::default()
        })
        .collect();
    let truncated = total.saturating_sub(out.len() as u64);
    Ok((out, truncated))
}

/// One group of [`contested_here`]: sums and the per-destination verdict's aggregates.
#[derive(Default)]
struct Contested {
    sums: Sums,
    /// The least node name of the group.
    node: u32,
    org: u32,
    geo_source: u32,
    answers: u32,
    contested: i64,
    operator_country: u32,
    physics: u32,
    impossible: bool,
    distance_km: i64,
    limit_km: i64,
}

/// The scorecard's `contested` grouping (country, the node's site and declared country, ASN,
/// destination address and port; each row names the least node of its group, as `verdict`'s
/// do) over the contested level and the minutes of the range's ends, grouped here for the
/// reason [`group_here`] gives: at 10,000 nodes a month of the level is about 250,000 rows.
/// By node it was more than 100,000 groups there, past the scorecard's read limit (every
/// scorecard said "truncated"); the policy places a node by its site and declared country, so
/// per place the answer is the same and a few hundred rows.
/// The same aggregates as the SQL: sums, the least non-zero RTT and limit, the greatest
/// organisation, source, answers, contested flag, operator country and distance, and the
/// physics verdict `impossible` when any row says so (else the greatest).
fn contested_here(
    conn: &Connection,
    q: &crate::store::EgressQuery,
    source: &str,
    values: &[i64],
) -> Result<(Vec<sov_proto::pb::EgressRow>, u64), StoreError> {
    const C: &str = "read egress row";
    type Key = (u32, u32, i64, u32, i64);
    let text = format!(
        "SELECT country, node, asn, remote_address, remote_port, org, geo_source, answers,
                contested, operator_country, physics, bytes_sent, bytes_received, connections,
                min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows
         FROM {source}"
    );
    let mut stmt = conn.prepare_cached(&text).map_err(sql("prepare egress"))?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(values))
        .map_err(sql("egress"))?;
    let mut names = Names::default();
    // Each node's place (its site and declared country, interned as one name), by node id.
    let mut places: foldhash::HashMap<String, u32> = foldhash::HashMap::default();
    {
        let mut stmt = conn
            .prepare_cached("SELECT node, COALESCE(site, ''), COALESCE(country, '') FROM nodes")
            .map_err(sql("prepare node places"))?;
        let mut rows = stmt.query([]).map_err(sql("node places"))?;
        while let Some(row) = rows.next().map_err(sql("node places"))? {
            let node: String = row.get(0).map_err(sql("node places"))?;
            let site: String = row.get(1).map_err(sql("node places"))?;
            let country: String = row.get(2).map_err(sql("node places"))?;
            places.insert(node, names.intern(&format!("{site}\u{0}{country}")));
        }
    }
    let nowhere = names.intern("\u{0}");
    let mut place_of: Vec<u32> = Vec::new();
    let mut groups: foldhash::HashMap<Key, Contested> = foldhash::HashMap::default();
    let int = |row: &rusqlite::Row<'_>, i: usize| row.get::<_, i64>(i).map_err(sql(C));
    let count = |row: &rusqlite::Row<'_>, i: usize| -> Result<u64, StoreError> {
        Ok(u64::try_from(int(row, i)?).unwrap_or(0))
    };
    // The greater of two interned names.
    let greater = |names: &Names, a: u32, b: u32| {
        if a != b && names.name(b) > names.name(a) {
            b
        } else {
            a
        }
    };
    while let Some(row) = rows.next().map_err(sql(C))? {
        let node = names.id(row, 1)?;
        let at = node as usize;
        if place_of.len() <= at {
            place_of.resize(at + 1, u32::MAX);
        }
        if place_of[at] == u32::MAX {
            place_of[at] = places.get(names.name(node)).copied().unwrap_or(nowhere);
        }
        let key = (
            names.id(row, 0)?,
            place_of[at],
            int(row, 2)?,
            names.id(row, 3)?,
            int(row, 4)?,
        );
        let (org, geo, answers) = (names.id(row, 5)?, names.id(row, 6)?, names.id(row, 7)?);
        let (operator, physics) = (names.id(row, 9)?, names.id(row, 10)?);
        let contested = int(row, 8)?;
        let g = groups.entry(key).or_insert_with(|| Contested {
            node,
            org,
            geo_source: geo,
            answers,
            contested,
            operator_country: operator,
            physics,
            ..Contested::default()
        });
        if node != g.node && names.name(node) < names.name(g.node) {
            g.node = node;
        }
        g.org = greater(&names, g.org, org);
        g.geo_source = greater(&names, g.geo_source, geo);
        g.answers = greater(&names, g.answers, answers);
        g.contested = g.contested.max(contested);
        g.operator_country = greater(&names, g.operator_country, operator);
        g.physics = greater(&names, g.physics, physics);
        g.impossible |= names.name(physics) == "impossible";
        let s = &mut g.sums;
        s.sent = s.sent.saturating_add(count(row, 11)?);
        s.received = s.received.saturating_add(count(row, 12)?);
        s.connections = s.connections.saturating_add(count(row, 13)?);
        let rtt = u32::try_from(int(row, 14)?).unwrap_or(0);
        if rtt != 0 && (s.min_rtt_us == 0 || rtt < s.min_rtt_us) {
            s.min_rtt_us = rtt;
        }
        g.distance_km = g.distance_km.max(int(row, 15)?);
        let limit = int(row, 16)?;
        if limit != 0 && (g.limit_km == 0 || limit < g.limit_km) {
            g.limit_km = limit;
        }
        s.conntrack_bytes = s.conntrack_bytes.saturating_add(count(row, 17)?);
        s.unmeasured_flows = s.unmeasured_flows.saturating_add(count(row, 18)?);
    }
    let total = groups.len() as u64;
    let groups: Vec<(Key, Contested)> = groups.into_iter().collect();
    let name = |i: u32| names.name(i);
    let order = |a: &(Key, Contested), b: &(Key, Contested)| {
        (b.1.sums.sent, b.1.sums.received)
            .cmp(&(a.1.sums.sent, a.1.sums.received))
            .then_with(|| {
                let k = |k: &Key| (name(k.0), name(k.1), k.2, name(k.3), k.4);
                k(&a.0).cmp(&k(&b.0))
            })
    };
    let out: Vec<sov_proto::pb::EgressRow> = largest(groups, q.limit, order)
        .into_iter()
        .map(|(k, g)| sov_proto::pb::EgressRow {
            country: name(k.0).to_owned(),
            node: name(g.node).to_owned(),
            asn: u32::try_from(k.2).unwrap_or(0),
            remote_address: name(k.3).to_owned(),
            remote_port: u32::try_from(k.4).unwrap_or(0),
            org: name(g.org).to_owned(),
            geo_source: name(g.geo_source).to_owned(),
            bytes_sent: g.sums.sent,
            bytes_received: g.sums.received,
            connections: g.sums.connections,
            min_rtt_us: g.sums.min_rtt_us,
            answers: crate::store::rows::answers(name(g.answers)),
            contested: g.contested != 0,
            operator_country: name(g.operator_country).to_owned(),
            physics: if g.impossible {
                "impossible".to_owned()
            } else {
                name(g.physics).to_owned()
            },
            distance_km: u32::try_from(g.distance_km).unwrap_or(0),
            limit_km: u32::try_from(g.limit_km).unwrap_or(0),
            conntrack_bytes: g.sums.conntrack_bytes,
            unmeasured_flows: g.sums.unmeasured_flows,
            ..Default::default()
        })
        .collect();
    let truncated = total.saturating_sub(out.len() as u64);
    Ok((out, truncated))
}

/// Where the hourly and daily rollups have come to (see [`crate::store::rollup`]).
pub(super) fn rolled_up_to(conn: &Connection) -> Result<crate::store::rollup::UpTo, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT name, up_to_ms FROM rollup_state")
        .map_err(sql("prepare rollup state"))?;
    let mut rows = stmt.query([]).map_err(sql("read rollup state"))?;
    let mut up_to = crate::store::rollup::UpTo::default();
    while let Some(row) = rows.next().map_err(sql("read rollup state"))? {
        let name: String = row.get(0).map_err(sql("read rollup state"))?;
        let at: i64 = row.get(1).map_err(sql("read rollup state"))?;
        match name.as_str() {
            "hourly" => up_to.hours = at,
            "daily" => up_to.days = at,
            _ => {}
        }
    }
    Ok(up_to)
}

pub(super) async fn missing_ranges(
    store: &SqliteStore,
    node: &str,
    epoch: u64,
    limit: u32,
) -> Result<Vec<(u64, u64)>, StoreError> {
    let reader = store.reader.clone();
    let node = node.to_owned();
    let epoch = to_i64(epoch, "epoch")?;
    tokio::task::spawn_blocking(move || {
        reader.with(|conn| {
            let missing: Option<i64> = conn
                .prepare_cached(crate::store::EPOCH_MISSING)
                .map_err(sql("prepare epoch missing"))?
                .query_row(params![node, epoch], |r| r.get(0))
                .optional()
                .map_err(sql("epoch missing"))?;
            let mut scan = crate::store::HoleScan::new(limit, missing);
            let mut stmt = conn
                .prepare_cached(crate::store::KEYS_PAGE)
                .map_err(sql("prepare missing ranges"))?;
            while scan.wants_more() {
                let page = stmt
                    .query_map(
                        params![node, epoch, scan.prev, crate::store::KEYS_PER_PAGE],
                        |r| r.get::<_, i64>(0),
                    )
                    .map_err(sql("missing ranges"))?
                    .collect::<Result<Vec<i64>, _>>()
                    .map_err(sql("read missing range"))?;
                if !scan.feed(&page) {
                    break;
                }
            }
            Ok(scan.ranges)
        })
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn gpu_usage(
    store: &SqliteStore,
    since_unix_ms: i64,
    until_unix_ms: i64,
    limit: u32,
) -> Result<Vec<GpuUsageRow>, StoreError> {
    let reader = store.reader.clone();
    tokio::task::spawn_blocking(move || {
        reader.with(|conn| {
            let plan =
                crate::store::rollup::plan(since_unix_ms, until_unix_ms, rolled_up_to(conn)?);
            let mut stmt = conn
                .prepare_cached(&crate::store::rollup::gpu_usage_query(
                    &plan,
                    &|i| format!("?{i}"),
                    "",
                ))
                .map_err(sql("prepare gpu usage"))?;
            let mut values = plan.params();
            values.push(i64::from(limit));
            let mut rows = stmt
                .query(rusqlite::params_from_iter(values))
                .map_err(sql("gpu usage"))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(sql("gpu usage"))? {
                out.push(rows::gpu_usage(row)?);
            }
            Ok(out)
        })
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn reports_by_node(
    store: &SqliteStore,
    since_unix_ms: i64,
    until_unix_ms: i64,
    limit: u32,
) -> Result<Vec<(String, u64)>, StoreError> {
    let reader = store.reader.clone();
    tokio::task::spawn_blocking(move || {
        reader.with(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT node, COUNT(*) FROM reports
                 WHERE observed_ms >= ?1 AND observed_ms < ?2
                 GROUP BY node ORDER BY node LIMIT ?3",
                )
                .map_err(sql("prepare reports by node"))?;
            let mut rows = stmt
                .query(params![since_unix_ms, until_unix_ms, i64::from(limit)])
                .map_err(sql("reports by node"))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(sql("reports by node"))? {
                let node: String = row.get(0).map_err(sql("reports by node"))?;
                let n: i64 = row.get(1).map_err(sql("reports by node"))?;
                out.push((node, u64::try_from(n).unwrap_or(0)));
            }
            Ok(out)
        })
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn list_nodes(
    store: &SqliteStore,
    after: &str,
    limit: u32,
) -> Result<Vec<NodeRow>, StoreError> {
    let reader = store.reader.clone();
    let after = after.to_owned();
    tokio::task::spawn_blocking(move || {
        reader.with(|conn| SqliteStore::list_nodes_blocking(conn, &after, limit))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn list_models(
    store: &SqliteStore,
    query: &str,
    after: &str,
    limit: u32,
) -> Result<Vec<sov_proto::pb::ModelSummary>, StoreError> {
    let reader = store.reader.clone();
    let (query, after) = (query.to_owned(), after.to_owned());
    tokio::task::spawn_blocking(move || {
        reader.with(|conn| SqliteStore::list_models_blocking(conn, &query, &after, limit))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn model_holdings(
    store: &SqliteStore,
    cap: u32,
) -> Result<(Vec<sov_proto::pb::ModelSummary>, bool), StoreError> {
    store
        .read(move |c| {
            let mut stmt = c
                .prepare_cached(crate::store::MODEL_HOLDINGS)
                .map_err(sql("prepare model holdings"))?;
            let mut rows = stmt.query([]).map_err(sql("model holdings"))?;
            let mut out = std::collections::BTreeMap::new();
            while let Some(row) = rows.next().map_err(sql("read model holding"))? {
                rows::push_holding(&mut out, row)?;
            }
            let cut = out.len() > cap as usize;
            Ok((out.into_values().take(cap as usize).collect(), cut))
        })
        .await
}

pub(super) async fn egress(
    store: &SqliteStore,
    q: crate::store::EgressQuery,
) -> Result<(Vec<sov_proto::pb::EgressRow>, u64), StoreError> {
    let reader = store.reader.clone();
    tokio::task::spawn_blocking(move || reader.with(|conn| SqliteStore::egress_blocking(conn, &q)))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn node_peers(store: &SqliteStore) -> Result<Vec<NodePeer>, StoreError> {
    store
        .read(|c| {
            let mut stmt = c
            .prepare_cached(
                "SELECT node, address, country, asn, source, seen_ms FROM node_peers ORDER BY node",
            )
            .map_err(sql("prepare node peers"))?;
            let mut rows = stmt.query([]).map_err(sql("node peers"))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(sql("node peers"))? {
                out.push(rows::peer(r)?);
            }
            Ok(out)
        })
        .await
}

pub(super) async fn derive_status(store: &SqliteStore) -> Result<DeriveStatus, StoreError> {
    store
        .read(|c| {
            let (pending, oldest): (i64, Option<i64>) = c
                .prepare_cached("SELECT COUNT(*), MIN(received_ms) FROM derive_queue")
                .map_err(sql("prepare derive status"))?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(sql("read derive status"))?;
            Ok(DeriveStatus {
                pending: to_u64(pending, "pending derivations")?,
                oldest_pending_received_unix_ms: oldest,
            })
        })
        .await
}
