//! Hourly rollups (issue 14, queries at volume): the regulators' questions over a month or a
//! year read hour rows instead of minute rows.
//!
//! `flows_hour` sums `flows_minute` by (node, hour, process, direction, destination country,
//! ASN, and the destination's verdict: answers, contested, operator country, physics — what
//! the policy counts by), without the destination address; `gpu_usage_hour` sums `gpu_usage`
//! by (node, hour, process, Kubernetes namespace). [`super::Store::roll_up`] rolls complete
//! hours up to a point, one hour per transaction, and records how far
//! (`rollup_state.up_to_ms`); a row derived later for an hour already rolled up (a late
//! report) is added to its hour row by a trigger in the same transaction. The rollup copies:
//! minute and raw rows stay for their own retention, so the per-destination and
//! per-container groupings still read minutes, and a range that starts or ends inside an
//! hour reads that hour's minutes ([`split`]): an answer is the same before and after a
//! rollup.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Store;

/// One hour, ms.
pub const HOUR_MS: i64 = 3_600_000;

/// How often the rollup loop runs.
pub const ROLLUP_EVERY: Duration = Duration::from_secs(300);

/// Default age after which complete hours are rolled up, hours (`rollup_after_hours`).
pub const DEFAULT_ROLLUP_AFTER_HOURS: u32 = 1;

/// PostgreSQL advisory lock between the rollup (exclusive) and the late-row triggers
/// (shared); the same number is in the hourly-rollup migration (0016).
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
    /// Every hour before this instant is rolled up.
    pub up_to_unix_ms: i64,
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

    /// The six range bounds in order: head, hours, tail.
    pub fn params(&self) -> [i64; 6] {
        [
            self.head.0,
            self.head.1,
            self.hours.0,
            self.hours.1,
            self.tail.0,
            self.tail.1,
        ]
    }
}

fn floor_hour(ms: i64) -> i64 {
    ms - ms.rem_euclid(HOUR_MS)
}

/// Split `[since, until)` at the whole hours rolled up before `up_to`.
pub fn split(since: i64, until: i64, up_to: i64) -> Split {
    let first = floor_hour(since.saturating_add(HOUR_MS - 1));
    let end = up_to.min(floor_hour(until));
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

/// Whether an egress grouping can read hour rows (it needs neither the destination address
/// nor the container).
pub fn by_hours(by: &str) -> bool {
    matches!(by, "" | "country" | "node" | "process" | "asn" | "verdict")
}

/// Whether an egress grouping selects each destination's verdict: per destination, and
/// `verdict` (the scorecard's: node, country, ASN and the verdict, summed over addresses).
pub fn per_destination(by: &str) -> bool {
    matches!(by, "destination" | "flow" | "verdict" | "contested")
}

/// The `verdict` grouping's columns: what the policy counts a row by, per node.
pub const VERDICT_GROUP: &str = "country, node, asn, answers, contested, operator_country, physics";

/// The columns an egress query reads from its source.
const FLOW_COLUMNS: &str = "node, pid, process, country, asn, org, remote_address, remote_port, geo_source, \
     bytes_sent, bytes_received, connections, min_rtt_us, answers, contested, operator_country, physics, \
     distance_km, limit_km, conntrack_bytes, unmeasured_flows";

/// The egress source (named `flows_minute`, filtered) for an hour-capable grouping over
/// `split`: minutes of the head, hours, minutes of the tail. `p(i)` is the backend's i-th
/// (1-based) placeholder for [`Split::params`], `text` and `num` its empty text and zero.
pub fn flows_source(p: &dyn Fn(usize) -> String, text: &str, num: &str) -> String {
    let hour_cols = FLOW_COLUMNS
        .replace("remote_address,", &format!("{text} AS remote_address,"))
        .replace("remote_port,", &format!("{num} AS remote_port,"));
    format!(
        "(SELECT {FLOW_COLUMNS} FROM flows_minute
          WHERE minute_ms >= {} AND minute_ms < {} AND direction <> 'inbound'
          UNION ALL
          SELECT {hour_cols} FROM flows_hour
          WHERE hour_ms >= {} AND hour_ms < {} AND direction <> 'inbound'
          UNION ALL
          SELECT {FLOW_COLUMNS} FROM flows_minute
          WHERE minute_ms >= {} AND minute_ms < {} AND direction <> 'inbound') AS flows_minute",
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6)
    )
}

/// GPU-seconds per (node, pid, process, namespace) over [`Split::params`] (`p` as in
/// [`flows_source`]), largest first, at most `p(7)` rows: raw rows of the head and tail, hour
/// rows between. The same columns as [`super::containers::GPU_USAGE_WITH_NAMESPACE`].
/// `collate` orders node names ("" or PostgreSQL's ` COLLATE "C"`).
pub fn gpu_usage_query(p: &dyn Fn(usize) -> String, collate: &str) -> String {
    format!(
        "SELECT node, pid, process_name, ns, SUM(s) FROM (
           SELECT g.node, g.pid, g.process_name, COALESCE(c.pod_namespace, '') AS ns, g.gpu_seconds AS s
           FROM gpu_usage g
           LEFT JOIN containers_minute c ON c.node = g.node AND c.pid = g.pid
                AND c.minute_ms = g.observed_ms - (g.observed_ms % 60000)
           WHERE (g.observed_ms >= {} AND g.observed_ms < {}) OR (g.observed_ms >= {} AND g.observed_ms < {})
           UNION ALL
           SELECT node, pid, process_name, pod_namespace, gpu_seconds FROM gpu_usage_hour
           WHERE hour_ms >= {} AND hour_ms < {}) AS u
         GROUP BY node, pid, process_name, ns
         ORDER BY 5 DESC, node{collate}, pid LIMIT {}",
        p(1),
        p(2),
        p(5),
        p(6),
        p(3),
        p(4),
        p(7)
    )
}

/// Roll one hour `[$1, $2)` of flow minutes into `flows_hour` (adding to rows already there).
/// Both backends run this text (`max`/`min` of two arguments are `GREATEST`/`LEAST` in
/// PostgreSQL: the backends substitute).
pub const ROLL_FLOWS: &str = "INSERT INTO flows_hour AS h (node, hour_ms, pid, process, direction, country, asn, answers,
        contested, operator_country, physics, org, geo_source, bytes_sent, bytes_received, connections,
        min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows)
     SELECT node, minute_ms - (minute_ms % 3600000), pid, process, direction, country, asn, answers,
            contested, operator_country, physics, MAX(org), MAX(geo_source), SUM(bytes_sent),
            SUM(bytes_received), SUM(connections), COALESCE(MIN(NULLIF(min_rtt_us, 0)), 0),
            MAX(distance_km), COALESCE(MIN(NULLIF(limit_km, 0)), 0), SUM(conntrack_bytes),
            SUM(unmeasured_flows)
     FROM flows_minute WHERE minute_ms >= $1 AND minute_ms < $2
     GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
     ON CONFLICT (hour_ms, node, pid, process, direction, country, asn, answers, contested,
                  operator_country, physics) DO UPDATE SET
        bytes_sent = h.bytes_sent + excluded.bytes_sent,
        bytes_received = h.bytes_received + excluded.bytes_received,
        connections = h.connections + excluded.connections,
        conntrack_bytes = h.conntrack_bytes + excluded.conntrack_bytes,
        unmeasured_flows = h.unmeasured_flows + excluded.unmeasured_flows";

/// Roll one hour `[$1, $2)` of GPU usage into `gpu_usage_hour`.
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

/// Where the next hour to roll up starts, and where it ends, given how far the rollup came
/// (`up_to`), the first row at or after it (`next_row`), and the end of what may be rolled
/// up (`target`, an hour boundary): `None` when nothing is left before `target`.
pub fn next_hour(up_to: i64, next_row: Option<i64>, target: i64) -> Option<(i64, i64)> {
    let start = match next_row {
        Some(t) => floor_hour(t).max(up_to),
        None => return None,
    };
    (start < target).then_some((start, start + HOUR_MS))
}

/// The end of the hours that may be rolled up at `now`: whole hours older than `after`.
pub fn target(now_unix_ms: i64, after: Duration) -> i64 {
    floor_hour(now_unix_ms.saturating_sub(i64::try_from(after.as_millis()).unwrap_or(i64::MAX)))
}

/// Roll up now and then every [`ROLLUP_EVERY`]: whole hours older than `after`.
pub async fn rollup_loop(store: Arc<dyn Store>, after: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(ROLLUP_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let before = target(sov_common::clock::now_unix_ms(), after);
        match store.roll_up(before).await {
            Ok(s) if s.hours > 0 => tracing::info!(
                hours = s.hours,
                flow_rows = s.flow_rows,
                gpu_rows = s.gpu_rows,
                up_to_unix_ms = s.up_to_unix_ms,
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
    fn empty_hours_are_skipped_and_the_target_is_never_passed() {
        let h = HOUR_MS;
        assert_eq!(
            next_hour(2 * h, Some(5 * h + 9), 9 * h),
            Some((5 * h, 6 * h))
        );
        assert_eq!(next_hour(2 * h, Some(9 * h), 9 * h), None);
        assert_eq!(next_hour(2 * h, None, 9 * h), None);
        assert_eq!(target(10 * h + 5, Duration::from_secs(3600)), 9 * h);
    }
}
