//! Hourly rollups (issue 14, queries at volume): the regulators' questions over a month or a
//! year read hour rows instead of minute rows.
//!
//! `flows_hour` sums `flows_minute` by (node, hour, process, direction, destination country,
//! ASN, and the destination's verdict: answers, contested, operator country, physics — what
//! the policy counts by), without the destination address; `gpu_usage_hour` sums `gpu_usage`
//! by (node, hour, process, Kubernetes namespace). [`super::Store::roll_up`] rolls complete
//! hours up to a point, one hour per transaction, and records how far
//! (`rollup_state.up_to_ms`); a row derived later for an hour already rolled up (a late
//! report) is added to its hour row by the deriver in the same transaction (set-based,
//! `store::minutes::HourChanges`; GPU rows by a trigger). The rollup copies:
//! minute and raw rows stay for their own retention, so the per-destination and
//! per-container groupings still read minutes (but for the scorecard's `contested` grouping,
//! which reads its own level, `contested_hour` and `contested_day`: [`contested_source`]),
//! and a range that starts or ends inside an hour reads that hour's minutes ([`split`]): an
//! answer is the same before and after a rollup.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Store;

/// One hour, ms.
pub const HOUR_MS: i64 = 3_600_000;

/// One day, ms (days are UTC days).
pub const DAY_MS: i64 = 86_400_000;

/// How often the rollup loop runs.
pub const ROLLUP_EVERY: Duration = Duration::from_secs(60);

/// Default age after which flow minutes are rolled up, hours (`rollup_after_hours`): 0, the
/// minutes older than [`ROLLUP_LAG`].
pub const DEFAULT_ROLLUP_AFTER_HOURS: u32 = 0;

/// The least age of a minute rolled up: reports of the minute before are still arriving (a
/// report covers up to one interval, 10 s by default); one arriving later still reaches the
/// hour and day rows, through the deriver's late-row path.
pub const ROLLUP_LAG: Duration = Duration::from_secs(120);

/// PostgreSQL advisory lock between the rollup (exclusive) and the deriver's late rows and the
/// GPU late-row triggers (shared); the same number is in the hourly-rollup migration (0016).
pub const ROLLUP_LOCK_KEY: i64 = 7_309_475_598_591_748_457;

/// What [`Store::roll_up`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupStats {
    /// Hours rolled up (one transaction each; hours without rows are skipped over).
    pub hours: u64,
    /// Hour rows written from flow minutes.
    pub flow_rows: u64,
    /// Hour rows written from GPU usage.
    pub gpu_rows: u64,
    /// Contested-level rows written (`contested_hour` and `contested_day`).
    pub contested_rows: u64,
    /// Every hour before this instant is rolled up.
    pub up_to_unix_ms: i64,
    /// Days rolled up from hour rows (one transaction each).
    pub days: u64,
    /// Day rows written from hour rows (flows and GPU usage).
    pub day_rows: u64,
    /// Every day before this instant is rolled up into day rows.
    pub days_up_to_unix_ms: i64,
}

/// The parts of `[since, until)` a query reads: minute (or raw) rows of `head` and `tail`,
/// hour rows of `hours` (complete hours before `up_to`). Empty parts are `(0, 0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// Rows before the first whole rolled-up hour.
    pub head: (i64, i64),
    /// Whole hours answered from hour rows.
    pub hours: (i64, i64),
    /// Rows from the end of those hours on.
    pub tail: (i64, i64),
}

impl Split {
    /// Whether any hour rows are read.
    pub fn has_hours(&self) -> bool {
        self.hours.0 < self.hours.1
    }
}

fn floor_hour(ms: i64) -> i64 {
    ms - ms.rem_euclid(HOUR_MS)
}

fn floor_minute(ms: i64) -> i64 {
    ms - ms.rem_euclid(60_000)
}

/// Split `[since, until)` at the rows of a level of `period` ms rolled up before `up_to`:
/// every period before `up_to` is in a row, and the period of `up_to` (when `up_to` is not on
/// a boundary) is in a partial row holding exactly `[period start, up_to)`. Whole periods
/// inside the range are read from rows, and the partial one when the range goes past
/// `up_to`; the head and tail are left to the level below.
pub fn split_at(since: i64, until: i64, up_to: i64, period: i64) -> Split {
    let floor = |ms: i64| ms - ms.rem_euclid(period);
    let first = floor(since.saturating_add(period - 1));
    let end = if up_to <= until { up_to } else { floor(until) };
    if first >= end {
        return Split {
            head: (since, until),
            hours: (0, 0),
            tail: (0, 0),
        };
    }
    Split {
        head: (since, first),
        hours: (first, end),
        tail: (end, until),
    }
}

/// Split `[since, until)` at the hours rolled up before `up_to` ([`split_at`]).
pub fn split(since: i64, until: i64, up_to: i64) -> Split {
    split_at(since, until, up_to, HOUR_MS)
}

/// Where both rollups have come to: every hour before `hours` is in hour rows, every day
/// before `days` in day rows (`days <= hours`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpTo {
    /// End of the rolled-up hours (`rollup_state` 'hourly').
    pub hours: i64,
    /// End of the rolled-up days (`rollup_state` 'daily').
    pub days: i64,
}

/// The ranges of each level a query over `[since, until)` reads ([`plan`]): raw or minute
/// rows, hour rows, day rows. Together they cover the range exactly once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Ranges read from minute (or raw) rows.
    pub minutes: Vec<(i64, i64)>,
    /// Whole hours read from hour rows.
    pub hours: Vec<(i64, i64)>,
    /// Whole days read from day rows.
    pub days: Vec<(i64, i64)>,
    /// Rest-of-day rows (`flows_rest`) read: `(from, from + 1)` stands for the rows of the
    /// node-level start `from` (an hour), which hold `[from, the end of its day)`.
    pub rest: Vec<(i64, i64)>,
}

impl Plan {
    /// Whether any hour or day rows are read.
    pub fn has_rollups(&self) -> bool {
        !self.hours.is_empty() || !self.days.is_empty() || !self.rest.is_empty()
    }

    /// Every range bound in order: minutes, hours, days, rest-of-day starts (what
    /// [`flows_source`] and [`gpu_usage_query`] number their placeholders by).
    pub fn params(&self) -> Vec<i64> {
        self.minutes
            .iter()
            .chain(&self.hours)
            .chain(&self.days)
            .chain(&self.rest)
            .flat_map(|&(a, b)| [a, b])
            .collect()
    }
}

fn floor_day(ms: i64) -> i64 {
    ms - ms.rem_euclid(DAY_MS)
}

/// The plan for `[since, until)` given how far the rollups came: whole rolled-up days from
/// day rows, whole rolled-up hours around them from hour rows, the rest from minutes. The
/// partial periods at both ends are what keeps an answer exact to the minute.
pub fn plan(since: i64, until: i64, up_to: UpTo) -> Plan {
    let mut out = Plan::default();
    // Day rows hold whole hours only; never trust them past the rolled-up hours.
    let days_up_to = up_to.days.min(floor_hour(up_to.hours));
    let d = split_at(since, until, days_up_to, DAY_MS);
    let rest = if d.has_hours() {
        out.days.push(d.hours);
        vec![d.head, d.tail]
    } else {
        vec![(since, until)]
    };
    for (a, b) in rest {
        if a >= b {
            continue;
        }
        let s = split(a, b, up_to.hours);
        for (part, level) in [(s.head, 0), (s.hours, 1), (s.tail, 0)] {
            if part.0 < part.1 {
                if level == 0 {
                    out.minutes.push(part);
                } else {
                    out.hours.push(part);
                }
            }
        }
    }
    if out.minutes.is_empty() && !out.has_rollups() {
        out.minutes.push((since, until));
    }
    out
}

/// [`plan`], but a range that starts on an hour inside a day rolled up into day rows, and
/// reads whole days after it, reads the rest of that first day from its rest-of-day rows
/// (`flows_rest`, or `fleet_rest` for a fleet grouping: one row set instead of up to 23
/// hours of hour rows).
pub fn plan_with_rest(since: i64, until: i64, up_to: UpTo) -> Plan {
    let days_up_to = up_to.days.min(floor_hour(up_to.hours));
    let d = split_at(since, until, days_up_to, DAY_MS);
    let head = d.head;
    if !d.has_hours() || head.0 >= head.1 || since.rem_euclid(HOUR_MS) != 0 {
        return plan(since, until, up_to);
    }
    // The head is [since, its day's end), wholly rolled up into day rows: one rest row set.
    let mut out = plan(head.1, until, up_to);
    out.rest.push((since, since + 1));
    out
}

/// Whether an egress grouping can read hour and day rows (it needs neither the destination
/// address nor the container).
pub fn by_hours(by: &str) -> bool {
    matches!(by, "" | "country" | "node" | "process" | "asn" | "verdict")
}

/// Whether an egress grouping selects each destination's verdict: per destination, and
/// `verdict` (the scorecard's: node, country, ASN and the verdict, summed over addresses).
pub fn per_destination(by: &str) -> bool {
    matches!(by, "destination" | "flow" | "verdict" | "contested")
}

/// The `verdict` grouping's columns: what the policy counts a row by, per node site and
/// declared country (all the scorecard needs of the node: the policy places a node by
/// them), so that a fleet's month is a few thousand groups, not one per node and
/// destination key. Each row names one node of its group (`MIN(node)`).
pub const VERDICT_GROUP: &str =
    "node_site, node_country, country, asn, answers, contested, operator_country, physics";

/// The egress source `source` (a table or a subquery, named `flows_minute`) with each row's
/// node site and declared country (`node_site`, `node_country`), for the `verdict` grouping.
pub fn with_node_site(source: &str) -> String {
    format!(
        "(SELECT flows_minute.*, COALESCE(nd.site, '') AS node_site, COALESCE(nd.country, '') AS node_country
          FROM {source} LEFT JOIN nodes nd ON nd.node = flows_minute.node) AS flows_minute"
    )
}

/// The columns an egress query reads from its source.
pub(crate) const FLOW_COLUMNS: &str = "node, pid, process, country, asn, org, remote_address, remote_port, geo_source, \
     bytes_sent, bytes_received, connections, min_rtt_us, answers, contested, operator_country, physics, \
     distance_km, limit_km, conntrack_bytes, unmeasured_flows";

/// One `UNION ALL` branch per range of `plan`, numbering placeholders as [`Plan::params`]
/// does: `branch(level, from, to)` writes the branch of one range, level 0 minutes, 1 hours,
/// 2 days, 3 rest-of-day rows.
fn branches(
    plan: &Plan,
    p: &dyn Fn(usize) -> String,
    branch: &dyn Fn(usize, &str, &str) -> String,
) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    for (level, ranges) in [&plan.minutes, &plan.hours, &plan.days, &plan.rest]
        .into_iter()
        .enumerate()
    {
        for _ in ranges {
            parts.push(branch(level, &p(i + 1), &p(i + 2)));
            i += 2;
        }
    }
    parts.join("\n          UNION ALL\n          ")
}

/// The distinct nodes of `flows_minute`, one primary-key seek each (a loose index scan: the
/// key starts with the node), as the recursive common table `minute_nodes`.
const MINUTE_NODES: &str = "WITH RECURSIVE minute_nodes(node) AS (
            SELECT MIN(node) FROM flows_minute
            UNION ALL
            SELECT (SELECT MIN(f.node) FROM flows_minute f WHERE f.node > minute_nodes.node)
            FROM minute_nodes WHERE minute_nodes.node IS NOT NULL)
          ";

/// How a branch reads the minute rows of one range (`fm`, columns qualified): through
/// `flows_minute_by_time`, or (`by_node`, SQLite) node by node along the primary key
/// (`node, minute_ms, …`), which [`MINUTE_NODES`] makes possible. On SQLite the index costs a
/// primary-key lookup per row (the table has no rowid); node by node, a range of minutes is
/// one seek per node and then consecutive rows: the tail of a range (the two or three
/// minutes since the hourly rollup) of 1,000 nodes is about 150,000 rows.
fn minute_from(by_node: bool) -> &'static str {
    if by_node {
        "minute_nodes mn CROSS JOIN flows_minute fm ON fm.node = mn.node"
    } else {
        "flows_minute fm"
    }
}

/// [`minute_from`] with each row's node as `nd` (its `nodes` row, if any). Node by node, the
/// node's row is looked up once per node, before its minute rows, not once per minute row: at
/// 10,000 nodes the tail of a range is about a million minute rows and ten thousand nodes.
fn minute_from_with_site(by_node: bool) -> &'static str {
    if by_node {
        "minute_nodes mn LEFT JOIN nodes nd ON nd.node = mn.node
          CROSS JOIN flows_minute fm ON fm.node = mn.node"
    } else {
        "flows_minute fm LEFT JOIN nodes nd ON nd.node = fm.node"
    }
}

/// The columns the groupings summed in the collector read (SQLite's `group_here`: country,
/// node, process, pid or ASN, organisation, and the sums), a subset of [`FLOW_COLUMNS`]: every
/// branch of a source decodes each column it selects for each row, also the ones the query
/// over it does not read (the verdict's answers are a JSON text), and at 10,000 nodes
/// `--by process` over a week is 7 M rows.
pub const SUMMED_COLUMNS: &str = "node, pid, process, country, asn, org, bytes_sent, bytes_received, \
     connections, min_rtt_us, conntrack_bytes, unmeasured_flows";

/// `cols` qualified with `fm.`.
fn minute_cols(cols: &str) -> String {
    cols.split(", ")
        .map(|c| format!("fm.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `body` (branches joined by `UNION ALL`) as the source named `flows_minute`, with
/// [`MINUTE_NODES`] first when a branch reads minutes node by node.
fn source(plan: &Plan, by_node: bool, body: &str) -> String {
    let with = if by_node && !plan.minutes.is_empty() {
        MINUTE_NODES
    } else {
        ""
    };
    format!("({with}{body}) AS flows_minute")
}

/// The egress source (named `flows_minute`, filtered) for an hour-capable grouping over
/// `plan`: minutes, hours and days of its ranges. `p(i)` is the backend's i-th (1-based)
/// placeholder for [`Plan::params`], `text` and `num` its empty text and zero; `by_node`
/// reads minutes node by node ([`minute_from`]); `cols` are the columns every branch has:
/// [`FLOW_COLUMNS`], or a subset of them such as [`SUMMED_COLUMNS`].
pub fn flows_source(
    plan: &Plan,
    p: &dyn Fn(usize) -> String,
    text: &str,
    num: &str,
    by_node: bool,
    cols: &str,
) -> String {
    let rolled_cols = cols
        .replace("remote_address,", &format!("{text} AS remote_address,"))
        .replace("remote_port,", &format!("{num} AS remote_port,"));
    let body = branches(plan, p, &|level, a, b| {
        let (table, t) = match level {
            0 => {
                return format!(
                    "SELECT {} FROM {}
          WHERE fm.minute_ms >= {a} AND fm.minute_ms < {b} AND fm.direction <> 'inbound'",
                    minute_cols(cols),
                    minute_from(by_node)
                );
            }
            1 => ("flows_hour", "hour_ms"),
            2 => ("flows_day", "day_ms"),
            _ => ("flows_rest", "from_ms"),
        };
        format!(
            "SELECT {rolled_cols} FROM {table}
          WHERE {t} >= {a} AND {t} < {b} AND direction <> 'inbound'"
        )
    });
    source(plan, by_node, &body)
}

/// Whether an egress grouping can read the fleet-level hour and day rows (`fleet_hour`,
/// `fleet_day`: no node, no process): by destination country, by ASN, and the scorecard's
/// `verdict` grouping (node site and declared country, destination country, ASN, verdict).
pub fn by_fleet(by: &str) -> bool {
    matches!(by, "" | "country" | "asn" | "verdict")
}

/// The egress source (named `flows_minute`, filtered) for a fleet grouping ([`by_fleet`])
/// over `plan`: minute rows of its minute ranges (with their node's site and declared country
/// when `sites`), fleet hour, day and rest-of-day rows of the others. Every branch has the columns of
/// `cols` plus `node_site` and `node_country`; a fleet row's `node` is one node of its
/// group. `p`, `text`, `num`, `by_node` and `cols` as in [`flows_source`].
pub fn fleet_source(
    plan: &Plan,
    p: &dyn Fn(usize) -> String,
    text: &str,
    num: &str,
    sites: bool,
    by_node: bool,
    cols: &str,
) -> String {
    let rolled_cols = format!(
        "{}, node_site, node_country",
        cols.replace(
            "pid, process,",
            &format!("{num} AS pid, {text} AS process,")
        )
        .replace("remote_address,", &format!("{text} AS remote_address,"))
        .replace("remote_port,", &format!("{num} AS remote_port,"))
    );
    let body = branches(plan, p, &|level, a, b| match level {
        0 if sites => format!(
            "SELECT {}, COALESCE(nd.site, '') AS node_site, COALESCE(nd.country, '') AS node_country
          FROM {}
          WHERE fm.minute_ms >= {a} AND fm.minute_ms < {b} AND fm.direction <> 'inbound'",
            minute_cols(cols),
            minute_from_with_site(by_node)
        ),
        0 => format!(
            "SELECT {}, {text} AS node_site, {text} AS node_country FROM {}
          WHERE fm.minute_ms >= {a} AND fm.minute_ms < {b} AND fm.direction <> 'inbound'",
            minute_cols(cols),
            minute_from(by_node)
        ),
        1 => format!(
            "SELECT {rolled_cols} FROM fleet_hour
          WHERE hour_ms >= {a} AND hour_ms < {b} AND direction <> 'inbound'"
        ),
        2 => format!(
            "SELECT {rolled_cols} FROM fleet_day
          WHERE day_ms >= {a} AND day_ms < {b} AND direction <> 'inbound'"
        ),
        _ => format!(
            "SELECT {rolled_cols} FROM fleet_rest
          WHERE from_ms >= {a} AND from_ms < {b} AND direction <> 'inbound'"
        ),
    });
    source(plan, by_node, &body)
}

/// GPU-seconds per (node, pid, process, namespace) over `plan` (`p` as in [`flows_source`]),
/// largest first, at most `p(n + 1)` rows for `n` range bounds: raw rows for the minute
/// ranges, hour and day rows for theirs. The same columns as
/// [`super::containers::GPU_USAGE_WITH_NAMESPACE`]. `collate` orders node names ("" or
/// PostgreSQL's ` COLLATE "C"`).
pub fn gpu_usage_query(plan: &Plan, p: &dyn Fn(usize) -> String, collate: &str) -> String {
    let body = branches(plan, p, &|level, a, b| {
        match level {
        0 => format!(
            "SELECT g.node, g.pid, g.process_name, COALESCE(c.pod_namespace, '') AS ns, g.gpu_seconds AS s
           FROM gpu_usage g
           LEFT JOIN containers_minute c ON c.node = g.node AND c.pid = g.pid
                AND c.minute_ms = g.observed_ms - (g.observed_ms % 60000)
           WHERE g.observed_ms >= {a} AND g.observed_ms < {b}"
        ),
        1 => format!(
            "SELECT node, pid, process_name, pod_namespace AS ns, gpu_seconds AS s FROM gpu_usage_hour
           WHERE hour_ms >= {a} AND hour_ms < {b}"
        ),
        _ => format!(
            "SELECT node, pid, process_name, pod_namespace AS ns, gpu_seconds AS s FROM gpu_usage_day
           WHERE day_ms >= {a} AND day_ms < {b}"
        ),
    }
    });
    let limit = p(plan.params().len() + 1);
    format!(
        "SELECT node, pid, process_name, ns, SUM(s) FROM (
           {body}) AS u
         GROUP BY node, pid, process_name, ns
         ORDER BY 5 DESC, node{collate}, pid LIMIT {limit}"
    )
}

/// The `DO UPDATE SET` of an upsert that adds a rolled-up flow row to the row `t` already
/// holds: sums added, the least non-zero RTT and speed-of-light limit, the greatest distance,
/// organisation and geolocation source.
fn add_flow_row(t: &str) -> String {
    format!(
        "bytes_sent = {t}.bytes_sent + excluded.bytes_sent,
        bytes_received = {t}.bytes_received + excluded.bytes_received,
        connections = {t}.connections + excluded.connections,
        conntrack_bytes = {t}.conntrack_bytes + excluded.conntrack_bytes,
        unmeasured_flows = {t}.unmeasured_flows + excluded.unmeasured_flows,
        min_rtt_us = CASE WHEN {t}.min_rtt_us = 0 OR (excluded.min_rtt_us <> 0 AND excluded.min_rtt_us < {t}.min_rtt_us)
                          THEN excluded.min_rtt_us ELSE {t}.min_rtt_us END,
        limit_km = CASE WHEN {t}.limit_km = 0 OR (excluded.limit_km <> 0 AND excluded.limit_km < {t}.limit_km)
                        THEN excluded.limit_km ELSE {t}.limit_km END,
        distance_km = CASE WHEN excluded.distance_km > {t}.distance_km THEN excluded.distance_km ELSE {t}.distance_km END,
        org = CASE WHEN excluded.org > {t}.org THEN excluded.org ELSE {t}.org END,
        geo_source = CASE WHEN excluded.geo_source > {t}.geo_source THEN excluded.geo_source ELSE {t}.geo_source END"
    )
}

/// Roll `[$1, $2)` of node-level flow rows of `source` (stamped by `source_ms`) into the
/// periods of `period_ms` of `target` (stamped by `target_ms`), adding to rows already there
/// (the rest of a partial period). Both backends run this text.
fn roll_flows(
    target: &str,
    target_ms: &str,
    source: &str,
    source_ms: &str,
    period_ms: i64,
) -> String {
    roll_flows_keyed(target, target_ms, source, source_ms, period_ms, "", "")
}

/// [`roll_flows`] with `extra` (", col, col": more key columns, after the verdict) and
/// `filter` (" AND …": which source rows): the contested level's rows ([`ROLL_CONTESTED`]).
fn roll_flows_keyed(
    target: &str,
    target_ms: &str,
    source: &str,
    source_ms: &str,
    period_ms: i64,
    extra: &str,
    filter: &str,
) -> String {
    let keys = 11 + extra.matches(',').count();
    let group = (1..=keys)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO {target} AS t (node, {target_ms}, pid, process, direction, country, asn, answers,
        contested, operator_country, physics{extra}, org, geo_source, bytes_sent, bytes_received, connections,
        min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
     SELECT node, {source_ms} - ({source_ms} % {period_ms}), pid, process, direction, country, asn, answers,
            contested, operator_country, physics{extra}, MAX(org), MAX(geo_source), SUM(bytes_sent),
            SUM(bytes_received), SUM(connections), COALESCE(MIN(NULLIF(min_rtt_us, 0)), 0),
            MAX(distance_km), COALESCE(MIN(NULLIF(limit_km, 0)), 0), SUM(conntrack_bytes),
            SUM(unmeasured_flows)
     FROM {source} WHERE {source_ms} >= $1 AND {source_ms} < $2{filter}
     GROUP BY {group}
     ON CONFLICT ({target_ms}, node, pid, process, direction, country, asn, answers, contested,
                  operator_country, physics{extra}) DO UPDATE SET
        {}",
        add_flow_row("t")
    )
}

/// The key columns the contested level (`contested_hour`, `contested_day`) holds besides
/// those of `flows_hour`: the destination.
const CONTESTED_KEY: &str = ", remote_address, remote_port";

/// Roll `[$1, $2)` (one hour or part of one) of contested flow minutes (`contested <> 0`)
/// into `contested_hour`: the hour rows of the `contested` grouping (the scorecard's count of
/// contested destinations), with the destination address and port that `flows_hour` drops.
pub static ROLL_CONTESTED: LazyLock<String> = LazyLock::new(|| {
    roll_flows_keyed(
        "contested_hour",
        "hour_ms",
        "flows_minute",
        "minute_ms",
        HOUR_MS,
        CONTESTED_KEY,
        " AND contested <> 0",
    )
});

/// Roll `[$1, $2)` (whole hours of one day) of `contested_hour` into `contested_day`.
pub static ROLL_CONTESTED_DAY: LazyLock<String> = LazyLock::new(|| {
    roll_flows_keyed(
        "contested_day",
        "day_ms",
        "contested_hour",
        "hour_ms",
        DAY_MS,
        CONTESTED_KEY,
        "",
    )
});

/// The egress source (named `flows_minute`, filtered) of the `contested` grouping over `plan`
/// ([`plan`]: no rest-of-day rows): contested minute rows of its minute ranges (through the
/// partial covering index `flows_minute_contested`), `contested_hour` and `contested_day`
/// rows of the others. `p` as in [`flows_source`].
pub fn contested_source(plan: &Plan, p: &dyn Fn(usize) -> String) -> String {
    let body = branches(plan, p, &|level, a, b| {
        let (table, t) = match level {
            0 => ("flows_minute", "minute_ms"),
            1 => ("contested_hour", "hour_ms"),
            _ => ("contested_day", "day_ms"),
        };
        format!(
            "SELECT {FLOW_COLUMNS} FROM {table}
          WHERE {t} >= {a} AND {t} < {b} AND direction <> 'inbound' AND contested <> 0"
        )
    });
    format!("({body}) AS flows_minute")
}

/// Roll `[$1, $2)` (one hour or part of one) of flow minutes into `flows_hour`, adding to
/// rows already there (the rest of a partial hour).
pub static ROLL_FLOWS: LazyLock<String> = LazyLock::new(|| {
    roll_flows(
        "flows_hour",
        "hour_ms",
        "flows_minute",
        "minute_ms",
        HOUR_MS,
    )
});

/// Roll `[$1, $2)` (one hour or part of one) of GPU usage into `gpu_usage_hour`.
pub const ROLL_GPU: &str =
    "INSERT INTO gpu_usage_hour AS h (node, hour_ms, pid, process_name, pod_namespace, gpu_seconds)
     SELECT g.node, g.observed_ms - (g.observed_ms % 3600000), g.pid, g.process_name,
            COALESCE(c.pod_namespace, ''), SUM(g.gpu_seconds)
     FROM gpu_usage g
     LEFT JOIN containers_minute c ON c.node = g.node AND c.pid = g.pid
          AND c.minute_ms = g.observed_ms - (g.observed_ms % 60000)
     WHERE g.observed_ms >= $1 AND g.observed_ms < $2
     GROUP BY 1, 2, 3, 4, 5
     ON CONFLICT (hour_ms, node, pid, process_name, pod_namespace) DO UPDATE SET
        gpu_seconds = h.gpu_seconds + excluded.gpu_seconds";

/// The first row at or after `$1` in either source table (to skip hours without rows).
pub const NEXT_ROW: &str = "SELECT MIN(t) FROM (
       SELECT MIN(minute_ms) AS t FROM flows_minute WHERE minute_ms >= $1
       UNION ALL SELECT MIN(observed_ms) FROM gpu_usage WHERE observed_ms >= $1) AS x";

/// Roll `[$1, $2)` (one day or part of one, whole hours) of hour rows into `flows_day`,
/// adding to rows already there.
pub static ROLL_FLOWS_DAY: LazyLock<String> =
    LazyLock::new(|| roll_flows("flows_day", "day_ms", "flows_hour", "hour_ms", DAY_MS));

/// Add `[$1, $2)` (whole hours of one day) of hour rows to the rest-of-day rows
/// (`flows_rest`) of every start of that day after its first hour, up to each hour: the rows
/// of start `s` hold the hours from `s` to the end of the day rolled up so far.
pub static ROLL_FLOWS_REST: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO flows_rest AS d (node, from_ms, pid, process, direction, country, asn, answers,
        contested, operator_country, physics, org, geo_source, bytes_sent, bytes_received, connections,
        min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
     SELECT h.node, h.hour_ms - (h.hour_ms % 86400000) + k.k * 3600000, h.pid, h.process, h.direction,
            h.country, h.asn, h.answers, h.contested, h.operator_country, h.physics, MAX(h.org),
            MAX(h.geo_source), SUM(h.bytes_sent), SUM(h.bytes_received), SUM(h.connections),
            COALESCE(MIN(NULLIF(h.min_rtt_us, 0)), 0), MAX(h.distance_km),
            COALESCE(MIN(NULLIF(h.limit_km, 0)), 0), SUM(h.conntrack_bytes), SUM(h.unmeasured_flows)
     FROM flows_hour h JOIN day_hours k ON k.k * 3600000 <= h.hour_ms % 86400000
     WHERE h.hour_ms >= $1 AND h.hour_ms < $2
     GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
     ON CONFLICT (from_ms, node, pid, process, direction, country, asn, answers, contested,
                  operator_country, physics) DO UPDATE SET
        {}",
        add_flow_row("d")
    )
});

/// Add `[$1, $2)` (whole hours of one day) of fleet hour rows to the fleet rest-of-day rows
/// (`fleet_rest`), as [`ROLL_FLOWS_REST`] does for a node's rows.
pub static ROLL_FLEET_REST: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO fleet_rest AS d (from_ms, node_site, node_country, direction, country, asn,
        answers, contested, operator_country, physics, node, org, geo_source, bytes_sent, bytes_received,
        connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
     SELECT h.hour_ms - (h.hour_ms % 86400000) + k.k * 3600000, h.node_site, h.node_country, h.direction,
            h.country, h.asn, h.answers, h.contested, h.operator_country, h.physics, MIN(h.node),
            MAX(h.org), MAX(h.geo_source), SUM(h.bytes_sent), SUM(h.bytes_received), SUM(h.connections),
            COALESCE(MIN(NULLIF(h.min_rtt_us, 0)), 0), MAX(h.distance_km),
            COALESCE(MIN(NULLIF(h.limit_km, 0)), 0), SUM(h.conntrack_bytes), SUM(h.unmeasured_flows)
     FROM fleet_hour h JOIN day_hours k ON k.k * 3600000 <= h.hour_ms % 86400000
     WHERE h.hour_ms >= $1 AND h.hour_ms < $2
     GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
     ON CONFLICT (from_ms, node_site, node_country, direction, country, asn, answers, contested,
                  operator_country, physics) DO UPDATE SET
        node = CASE WHEN excluded.node < d.node THEN excluded.node ELSE d.node END,
        {}",
        add_flow_row("d")
    )
});

/// Roll `[$1, $2)` (whole hours of one day) of GPU hour rows into `gpu_usage_day`.
pub const ROLL_GPU_DAY: &str =
    "INSERT INTO gpu_usage_day AS d (node, day_ms, pid, process_name, pod_namespace, gpu_seconds)
     SELECT node, hour_ms - (hour_ms % 86400000), pid, process_name, pod_namespace, SUM(gpu_seconds)
     FROM gpu_usage_hour WHERE hour_ms >= $1 AND hour_ms < $2
     GROUP BY 1, 2, 3, 4, 5
     ON CONFLICT (day_ms, node, pid, process_name, pod_namespace) DO UPDATE SET
        gpu_seconds = d.gpu_seconds + excluded.gpu_seconds";

/// The first hour row at or after `$1` in either hour table (to skip days without rows).
pub const NEXT_HOUR_ROW: &str = "SELECT MIN(t) FROM (
       SELECT MIN(hour_ms) AS t FROM flows_hour WHERE hour_ms >= $1
       UNION ALL SELECT MIN(hour_ms) FROM gpu_usage_hour WHERE hour_ms >= $1) AS x";

/// Where the next part of a day to roll up starts and ends, as [`next_hour`] for hours: up
/// to the end of its day or `target`, whichever is first.
pub fn next_day(up_to: i64, next_row: Option<i64>, target: i64) -> Option<(i64, i64)> {
    let start = floor_day(next_row?).max(up_to);
    (start < target).then_some((start, (floor_day(start) + DAY_MS).min(target)))
}

/// The end of the hours that may be rolled into day rows when minutes are rolled up to
/// `hours_up_to`: the whole hours (the partial hour row is still growing).
pub fn day_target(hours_up_to: i64) -> i64 {
    floor_hour(hours_up_to)
}

/// Where the next part of an hour to roll up starts, and where it ends (the end of its hour
/// or `target`, whichever is first), given how far the rollup came (`up_to`), the first row
/// at or after it (`next_row`), and the end of what may be rolled up (`target`, a minute
/// boundary): `None` when nothing is left before `target`.
pub fn next_hour(up_to: i64, next_row: Option<i64>, target: i64) -> Option<(i64, i64)> {
    let start = match next_row {
        Some(t) => floor_hour(t).max(up_to),
        None => return None,
    };
    (start < target).then_some((start, (floor_hour(start) + HOUR_MS).min(target)))
}

/// How far the rollup waits for a deriver that is behind ([`target`]): a deriver further
/// behind than this does not hold back the rollup (nor, through it, the minute retention); its
/// rows then reach the hour and day rows as late rows.
pub const ROLLUP_WAITS_FOR_DERIVER: Duration = Duration::from_secs(3600);

/// The end of the minutes that may be rolled up at `now`: minutes older than `after`, and
/// at least [`ROLLUP_LAG`], counted from `derived_up_to` (every report received before it is
/// derived, [`super::DeriveStatus::derived_up_to`]) when derivation is behind, by at most
/// [`ROLLUP_WAITS_FOR_DERIVER`]. Rolling up minutes whose reports still wait in the derive
/// queue would make every one of their rows late (each one a write to the hour, day, fleet and
/// rest-of-day rows instead of one minute row), which slows a deriver that is already behind.
pub fn target(now_unix_ms: i64, after: Duration, derived_up_to: i64) -> i64 {
    let after = after.max(ROLLUP_LAG);
    let wait = i64::try_from(ROLLUP_WAITS_FOR_DERIVER.as_millis()).unwrap_or(i64::MAX);
    let from = now_unix_ms.min(derived_up_to.max(now_unix_ms.saturating_sub(wait)));
    floor_minute(from.saturating_sub(i64::try_from(after.as_millis()).unwrap_or(i64::MAX)))
}

/// Where [`Store::roll_up`] stops for `before`: its minute.
pub fn minute_target(before_unix_ms: i64) -> i64 {
    floor_minute(before_unix_ms)
}

/// Roll up now and then every [`ROLLUP_EVERY`]: whole hours older than `after`.
pub async fn rollup_loop(store: Arc<dyn Store>, after: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(ROLLUP_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = sov_common::clock::now_unix_ms();
        let derived_up_to = match store.derive_status().await {
            Ok(status) => status.derived_up_to(now),
            Err(err) => {
                tracing::warn!(error = %err, "rollup: derive queue unreadable; rolling up to now");
                now
            }
        };
        let before = target(now, after, derived_up_to);
        match store.roll_up(before).await {
            Ok(s) if s.hours > 0 || s.days > 0 => tracing::info!(
                hours = s.hours,
                flow_rows = s.flow_rows,
                gpu_rows = s.gpu_rows,
                contested_rows = s.contested_rows,
                up_to_unix_ms = s.up_to_unix_ms,
                days = s.days,
                day_rows = s.day_rows,
                days_up_to_unix_ms = s.days_up_to_unix_ms,
                "rolled up hours"
            ),
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "hourly rollup failed; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_split_at_whole_rolled_up_hours() {
        let h = HOUR_MS;
        // Mid-hour start, end past the rolled-up hours: minutes, hours, minutes.
        let s = split(h + 5, 10 * h + 7, 6 * h);
        assert_eq!(s.head, (h + 5, 2 * h));
        assert_eq!(s.hours, (2 * h, 6 * h));
        assert_eq!(s.tail, (6 * h, 10 * h + 7));
        // Nothing rolled up, or less than a whole hour: minutes only.
        assert!(!split(h + 5, 10 * h, 0).has_hours());
        assert!(!split(h + 5, 2 * h + 3, 9 * h).has_hours());
        // An end inside a rolled-up hour reads that hour's minutes.
        let s = split(0, 3 * h + 1, 9 * h);
        assert_eq!(
            (s.head, s.hours, s.tail),
            ((0, 0), (0, 3 * h), (3 * h, 3 * h + 1))
        );
    }

    #[test]
    fn a_range_reads_days_between_hours_between_minutes() {
        let (h, d) = (HOUR_MS, DAY_MS);
        let up_to = UpTo {
            hours: 5 * d + 7 * h,
            days: 5 * d,
        };
        // From mid-hour on day 1 to mid-hour on day 6: minutes, hours, days 2..5, hours of
        // day 5 up to the rolled-up hours, minutes after.
        let p = plan(d + 3 * h + 60_000, 6 * d + 2 * h + 120_000, up_to);
        assert_eq!(
            p.minutes,
            vec![
                (d + 3 * h + 60_000, d + 4 * h),
                (5 * d + 7 * h, 6 * d + 2 * h + 120_000)
            ]
        );
        assert_eq!(p.hours, vec![(d + 4 * h, 2 * d), (5 * d, 5 * d + 7 * h)]);
        assert_eq!(p.days, vec![(2 * d, 5 * d)]);
        // Bounds in order: minutes, hours, days.
        assert_eq!(p.params().len(), 10);
        // Nothing rolled up: one minute range; a day-aligned range inside the days: days only.
        let p = plan(d + 5, 3 * d, UpTo::default());
        assert!(!p.has_rollups());
        assert_eq!(p.minutes, vec![(d + 5, 3 * d)]);
        let p = plan(d, 3 * d, up_to);
        assert_eq!(
            (p.minutes.len(), p.hours.len(), p.days),
            (0, 0, vec![(d, 3 * d)])
        );
        // Days never pass the rolled-up hours, even if the state said so.
        let p = plan(
            0,
            4 * d,
            UpTo {
                hours: 2 * d,
                days: 3 * d,
            },
        );
        assert_eq!(p.days, vec![(0, 2 * d)]);
        assert_eq!(p.minutes, vec![(2 * d, 4 * d)]);
        assert_eq!(
            next_day(0, Some(2 * d + 5 * h), day_target(5 * d + 7 * h)),
            Some((2 * d, 3 * d))
        );
        // The partial day up to the whole hours rolled up, then nothing.
        assert_eq!(
            next_day(5 * d, Some(5 * d), day_target(5 * d + 7 * h + 60_000)),
            Some((5 * d, 5 * d + 7 * h))
        );
        assert_eq!(
            next_day(5 * d + 7 * h, Some(5 * d + 7 * h), 5 * d + 7 * h),
            None
        );
        // A partial row is read when the range goes past it, not when it ends inside it.
        let s = split(0, 3 * h, h + 30 * 60_000);
        assert_eq!(
            (s.hours, s.tail),
            ((0, h + 30 * 60_000), (h + 30 * 60_000, 3 * h))
        );
        let s = split(0, h + 10 * 60_000, h + 30 * 60_000);
        assert_eq!((s.hours, s.tail), ((0, h), (h, h + 10 * 60_000)));
    }

    #[test]
    fn a_range_from_an_hour_reads_the_rest_of_its_first_day_as_one_row_set() {
        let (h, d) = (HOUR_MS, DAY_MS);
        let up_to = UpTo {
            hours: 5 * d + 7 * h,
            days: 5 * d + 7 * h,
        };
        // From 03:00 on day 1: the rest of day 1 from its rest rows, days 2..5, today's day
        // row so far, then the minutes after the rolled-up hours.
        let p = plan_with_rest(d + 3 * h, 5 * d + 7 * h + 120_000, up_to);
        assert_eq!(p.rest, vec![(d + 3 * h, d + 3 * h + 1)]);
        assert_eq!(p.days, vec![(2 * d, 5 * d + 7 * h)]);
        assert!(p.hours.is_empty());
        assert_eq!(p.minutes, vec![(5 * d + 7 * h, 5 * d + 7 * h + 120_000)]);
        assert_eq!(p.params().len(), 6);
        // Not on the hour, or a first day not rolled up into day rows: as `plan`.
        let start = d + 3 * h + 60_000;
        assert_eq!(
            plan_with_rest(start, 5 * d, up_to),
            plan(start, 5 * d, up_to)
        );
        let early = UpTo {
            hours: 5 * d,
            days: d,
        };
        assert_eq!(
            plan_with_rest(d + 3 * h, 5 * d, early),
            plan(d + 3 * h, 5 * d, early)
        );
        // A range inside one day reads no rest rows.
        assert!(plan_with_rest(d + 3 * h, d + 9 * h, up_to).rest.is_empty());
    }

    #[test]
    fn empty_hours_are_skipped_and_the_target_is_never_passed() {
        let h = HOUR_MS;
        assert_eq!(
            next_hour(2 * h, Some(5 * h + 9), 9 * h),
            Some((5 * h, 6 * h))
        );
        assert_eq!(next_hour(2 * h, Some(9 * h), 9 * h), None);
        assert_eq!(next_hour(2 * h, None, 9 * h), None);
        // Partial hours: from where the last rollup stopped to the target.
        assert_eq!(
            next_hour(2 * h + 60_000, Some(2 * h + 60_000), 2 * h + 5 * 60_000),
            Some((2 * h + 60_000, 2 * h + 5 * 60_000))
        );
        assert_eq!(
            target(10 * h + 5, Duration::from_secs(3600), 10 * h + 5),
            9 * h
        );
    }

    #[test]
    fn the_rollup_waits_for_a_deriver_behind_but_not_for_ever() {
        let m = 60_000;
        let now = 100 * HOUR_MS + 30 * m + 5;
        let after = Duration::ZERO;
        // Nothing waiting: two minutes ago.
        assert_eq!(target(now, after, now), 100 * HOUR_MS + 28 * m);
        // Reports received ten minutes ago still wait: two minutes before them.
        assert_eq!(target(now, after, now - 10 * m), 100 * HOUR_MS + 18 * m);
        // A deriver three hours behind holds the rollup back by one hour only.
        assert_eq!(target(now, after, now - 3 * HOUR_MS), 99 * HOUR_MS + 28 * m);
        // A waiting report "from the future" (a clock ahead) changes nothing.
        assert_eq!(target(now, after, now + HOUR_MS), 100 * HOUR_MS + 28 * m);
    }
}
