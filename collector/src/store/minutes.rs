//! The flows of a whole derive batch merged in memory by aggregate key before they are
//! written (issue 14): one upsert per (node, minute, process id, protocol, direction,
//! destination) however many reports of the batch carry it, instead of one per flow. The merge
//! follows the upsert exactly ([`crate::store::VERDICT_UPSERT`] and the byte sums), so a row
//! is the same whether its flows were merged here or in the database.

use std::collections::BTreeMap;

use super::{IncomingReport, StoreError, VerdictColumns, direction_name, protocol_name, to_i64};

/// Node, minute, pid, protocol, direction, remote address, remote port.
pub(crate) type MinuteKey<'a> = (&'a str, i64, i64, &'static str, &'static str, &'a str, i64);

/// One `flows_minute` row being built.
#[derive(Debug, Default)]
pub(crate) struct MinuteSums<'a> {
    pub process: &'a str,
    pub country: &'a str,
    pub asn: i64,
    pub org: &'a str,
    pub geo_source: &'a str,
    pub bytes_sent: i64,
    pub bytes_received: i64,
    pub connections: i64,
    pub min_rtt_us: i64,
    /// The verdict of the flow with the tightest RTT (answers, physics, distances).
    pub verdict: Option<&'a VerdictColumns>,
    /// The latest flow's contested flag that was set.
    pub contested: bool,
    /// The latest non-empty operator country.
    pub operator_country: &'a str,
    pub conntrack_bytes: i64,
    pub unmeasured_flows: i64,
}

/// Late rows (issue 14, fourth round; made set-based in the fifth): a `flows_minute` row of a
/// minute before the hourly rollup's `up_to_ms` must also reach its hour row. This was a pair
/// of row triggers on `flows_minute`, paid (their `WHEN` evaluated, and on PostgreSQL both
/// transition tables filled) by every aggregate write; the deriver now reads `up_to_ms` once
/// per transaction and does it for the late rows only.
///
/// On SQLite the late rows of a batch are gathered into [`HourChanges`]: each stored row's
/// sums leave its hour row (read before the upsert), each merged row's join the hour row of
/// its (possibly new) verdict (returned by the upsert), and each hour row touched is then
/// written once for the whole batch. The triggers wrote an hour row once or twice for every
/// late minute row, and each hour-row write fires the day, fleet and rest-of-day triggers
/// (about 47 rows written for an hour late in its day): a batch whose flows are all late (an
/// agent back from an outage, a backlog, or a benchmark whose reports are dated in the past)
/// made the derive transaction, and the acknowledgements waiting behind it on the one writer,
/// that much longer. PostgreSQL does the same with two set-based statements
/// ([`LATE_HOUR_SUMS_OUT`], [`LATE_HOUR_SUMS_IN`]) whose hour-row triggers are per statement.
pub(crate) const LATE_HOUR_KEY: &str = "flows_hour.hour_ms = m.minute_ms - (m.minute_ms % 3600000)
      AND flows_hour.node = m.node AND flows_hour.pid = m.pid AND flows_hour.process = m.process
      AND flows_hour.direction = m.direction AND flows_hour.country = m.country
      AND flows_hour.asn = m.asn AND flows_hour.answers = m.answers
      AND flows_hour.contested = m.contested AND flows_hour.operator_country = m.operator_country
      AND flows_hour.physics = m.physics";

/// The additive sums of an hour row less a minute row `m` (see [`LATE_HOUR_KEY`]).
pub(crate) const LATE_HOUR_SUMS_OUT: &str = "bytes_sent = flows_hour.bytes_sent - m.bytes_sent,
        bytes_received = flows_hour.bytes_received - m.bytes_received,
        connections = flows_hour.connections - m.connections,
        conntrack_bytes = flows_hour.conntrack_bytes - m.conntrack_bytes,
        unmeasured_flows = flows_hour.unmeasured_flows - m.unmeasured_flows";

/// The columns of an hour row as inserted from minute rows.
pub(crate) const HOUR_COLUMNS: &str = "node, hour_ms, pid, process, direction, country, asn, answers, contested,
        operator_country, physics, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us,
        distance_km, limit_km, conntrack_bytes, unmeasured_flows";

/// A `flows_minute` row as the hour row it counts in ([`HOUR_COLUMNS`]' order, the minute
/// floored to its hour), read by [`hour_row`].
pub(crate) const MINUTE_AS_HOUR: &str =
    "node, minute_ms - (minute_ms % 3600000), pid, process, direction, country, asn,
        answers, contested, operator_country, physics, org, geo_source, bytes_sent, bytes_received,
        connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows";

/// How an hour row absorbs a minute row's sums (the former trigger's merge; both backends
/// know `excluded` and the table-qualified old row, and `min`/`max` of two values are written
/// with `CASE`, which both understand).
pub(crate) const LATE_HOUR_SUMS_IN: &str = "bytes_sent = flows_hour.bytes_sent + excluded.bytes_sent,
        bytes_received = flows_hour.bytes_received + excluded.bytes_received,
        connections = flows_hour.connections + excluded.connections,
        conntrack_bytes = flows_hour.conntrack_bytes + excluded.conntrack_bytes,
        unmeasured_flows = flows_hour.unmeasured_flows + excluded.unmeasured_flows,
        min_rtt_us = CASE WHEN flows_hour.min_rtt_us = 0 THEN excluded.min_rtt_us
                          WHEN excluded.min_rtt_us = 0 THEN flows_hour.min_rtt_us
                          WHEN excluded.min_rtt_us < flows_hour.min_rtt_us THEN excluded.min_rtt_us
                          ELSE flows_hour.min_rtt_us END,
        limit_km = CASE WHEN flows_hour.limit_km = 0 THEN excluded.limit_km
                        WHEN excluded.limit_km = 0 THEN flows_hour.limit_km
                        WHEN excluded.limit_km < flows_hour.limit_km THEN excluded.limit_km
                        ELSE flows_hour.limit_km END,
        distance_km = CASE WHEN excluded.distance_km > flows_hour.distance_km THEN excluded.distance_km
                           ELSE flows_hour.distance_km END,
        org = CASE WHEN excluded.org > flows_hour.org THEN excluded.org ELSE flows_hour.org END,
        geo_source = CASE WHEN excluded.geo_source > flows_hour.geo_source THEN excluded.geo_source
                          ELSE flows_hour.geo_source END";

/// The primary key of a `flows_hour` row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct HourKey {
    pub node: String,
    pub hour_ms: i64,
    pub pid: i64,
    pub process: String,
    pub direction: String,
    pub country: String,
    pub asn: i64,
    pub answers: String,
    pub contested: i64,
    pub operator_country: String,
    pub physics: String,
}

/// The other columns of a `flows_hour` row (or what a change adds to them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HourSums {
    pub org: String,
    pub geo_source: String,
    pub bytes_sent: i64,
    pub bytes_received: i64,
    pub connections: i64,
    pub min_rtt_us: i64,
    pub distance_km: i64,
    pub limit_km: i64,
    pub conntrack_bytes: i64,
    pub unmeasured_flows: i64,
}

/// A row read in [`MINUTE_AS_HOUR`]'s order, through the backend's readers of text and
/// integer columns (0-based).
pub(crate) fn hour_row<E>(
    text: impl Fn(usize) -> Result<String, E>,
    int: impl Fn(usize) -> Result<i64, E>,
) -> Result<(HourKey, HourSums), E> {
    Ok((
        HourKey {
            node: text(0)?,
            hour_ms: int(1)?,
            pid: int(2)?,
            process: text(3)?,
            direction: text(4)?,
            country: text(5)?,
            asn: int(6)?,
            answers: text(7)?,
            contested: int(8)?,
            operator_country: text(9)?,
            physics: text(10)?,
        },
        HourSums {
            org: text(11)?,
            geo_source: text(12)?,
            bytes_sent: int(13)?,
            bytes_received: int(14)?,
            connections: int(15)?,
            min_rtt_us: int(16)?,
            distance_km: int(17)?,
            limit_km: int(18)?,
            conntrack_bytes: int(19)?,
            unmeasured_flows: int(20)?,
        },
    ))
}

/// The smaller of two values where 0 means "unknown" (RTTs, distance limits).
fn min_known(a: i64, b: i64) -> i64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

/// The primary key of a `contested_hour` or `contested_day` row: the key of the `flows_hour`
/// (or `flows_day`) row it is part of, `hour_ms` holding the hour or the day, plus the
/// destination.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ContestedKey {
    pub rolled: HourKey,
    pub remote_address: String,
    pub remote_port: i64,
}

/// What a batch's late minute rows change in `flows_hour`, one entry per hour row: the sums
/// added (merged rows less stored ones), and whether a merged row joined it (then its org,
/// geo source, RTT and distances merge into the hour row as [`LATE_HOUR_SUMS_IN`] does, and the
/// row is inserted when missing). Exactly what the former triggers did row by row — subtract
/// the old minute row from its hour row, add the new one — summed per hour row, so each hour
/// row (and the day, fleet and rest-of-day rows its triggers keep) is written once a batch.
pub(crate) type HourChanges = LateChanges<HourKey>;

/// The same for the contested level (issue 14, sixth round's trigger pair moved into the
/// deriver): a late minute row with `contested <> 0` leaves, and its merged row joins, its
/// `contested_hour` row, and its `contested_day` row when its day is rolled up too.
pub(crate) type ContestedChanges = LateChanges<ContestedKey>;

/// Changes to rolled-up rows keyed by `K`, summed over a batch (see [`HourChanges`]).
#[derive(Debug)]
pub(crate) struct LateChanges<K> {
    rows: BTreeMap<K, (bool, HourSums)>,
}

impl<K> Default for LateChanges<K> {
    fn default() -> Self {
        Self {
            rows: BTreeMap::new(),
        }
    }
}

impl<K: Ord> LateChanges<K> {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// A stored minute row, about to be merged: its sums leave its hour row.
    pub fn leave(&mut self, key: K, s: &HourSums) {
        let (_, e) = self.rows.entry(key).or_default();
        e.bytes_sent = e.bytes_sent.saturating_sub(s.bytes_sent);
        e.bytes_received = e.bytes_received.saturating_sub(s.bytes_received);
        e.connections = e.connections.saturating_sub(s.connections);
        e.conntrack_bytes = e.conntrack_bytes.saturating_sub(s.conntrack_bytes);
        e.unmeasured_flows = e.unmeasured_flows.saturating_sub(s.unmeasured_flows);
    }

    /// A minute row as merged: its sums join its hour row.
    pub fn join(&mut self, key: K, s: HourSums) {
        let (joined, e) = self.rows.entry(key).or_default();
        *joined = true;
        e.bytes_sent = e.bytes_sent.saturating_add(s.bytes_sent);
        e.bytes_received = e.bytes_received.saturating_add(s.bytes_received);
        e.connections = e.connections.saturating_add(s.connections);
        e.conntrack_bytes = e.conntrack_bytes.saturating_add(s.conntrack_bytes);
        e.unmeasured_flows = e.unmeasured_flows.saturating_add(s.unmeasured_flows);
        e.min_rtt_us = min_known(e.min_rtt_us, s.min_rtt_us);
        e.limit_km = min_known(e.limit_km, s.limit_km);
        e.distance_km = e.distance_km.max(s.distance_km);
        if s.org > e.org {
            e.org = s.org;
        }
        if s.geo_source > e.geo_source {
            e.geo_source = s.geo_source;
        }
    }

    /// The hour rows to change: `(key, joined, sums)`; rows only left with nothing to take
    /// away are skipped.
    pub fn into_rows(self) -> impl Iterator<Item = (K, bool, HourSums)> {
        self.rows
            .into_iter()
            .filter(|(_, (joined, s))| {
                *joined
                    || s.bytes_sent != 0
                    || s.bytes_received != 0
                    || s.connections != 0
                    || s.conntrack_bytes != 0
                    || s.unmeasured_flows != 0
            })
            .map(|(k, (joined, s))| (k, joined, s))
    }
}

/// Late flow-minute rows written by this process so far (rows of minutes already rolled up
/// into hours when they were derived), both stores.
static LATE_ROWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Count `n` late rows written.
pub(crate) fn count_late(n: usize) {
    LATE_ROWS.fetch_add(
        u64::try_from(n).unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Late flow-minute rows this process has written (of minutes already rolled up into hours
/// when derived: each also changed its hour row); for benchmarks and diagnosis.
pub fn late_rows_written() -> u64 {
    LATE_ROWS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Split `sums` into the rows of minutes before `up_to_ms` (late: already rolled up into
/// hours) and the others.
#[allow(clippy::type_complexity)]
pub(crate) fn split_late<'s, 'a>(
    sums: &'s BTreeMap<MinuteKey<'a>, MinuteSums<'a>>,
    up_to_ms: i64,
) -> (
    Vec<(&'s MinuteKey<'a>, &'s MinuteSums<'a>)>,
    Vec<(&'s MinuteKey<'a>, &'s MinuteSums<'a>)>,
) {
    sums.iter().partition(|(k, _)| k.1 >= up_to_ms)
}

/// The minute a flow is counted in: its end, else the report's observation time.
pub(crate) fn flow_end(r: &IncomingReport, f: &sov_proto::pb::Flow) -> i64 {
    if f.end_unix_ms > 0 {
        f.end_unix_ms
    } else {
        r.observed_unix_ms
    }
}

/// Add `r`'s flows to `sums`, in order (reports in queue order, flows in report order).
pub(crate) fn add_report<'a>(
    sums: &mut BTreeMap<MinuteKey<'a>, MinuteSums<'a>>,
    r: &'a IncomingReport,
) -> Result<(), StoreError> {
    for f in &r.telemetry.flows {
        let fl = &f.flow;
        let end = flow_end(r, fl);
        let key = (
            r.node.as_str(),
            end - end.rem_euclid(60_000),
            i64::from(fl.pid),
            protocol_name(fl.protocol),
            direction_name(fl.direction),
            fl.remote_address.as_str(),
            i64::from(fl.remote_port),
        );
        // The first flow's place wins, as the upsert keeps the stored row's.
        let e = sums.entry(key).or_insert_with(|| MinuteSums {
            country: &f.country,
            asn: i64::from(f.asn),
            org: &f.org,
            geo_source: &f.geo_source,
            ..Default::default()
        });
        if !f.process.is_empty() {
            e.process = &f.process;
        }
        e.bytes_sent = e
            .bytes_sent
            .saturating_add(to_i64(fl.bytes_sent, "bytes_sent")?);
        e.bytes_received = e
            .bytes_received
            .saturating_add(to_i64(fl.bytes_received, "bytes_received")?);
        e.connections = e.connections.saturating_add(i64::from(fl.connections));
        let rtt = i64::from(fl.min_rtt_us);
        if e.verdict.is_none() || (rtt != 0 && (e.min_rtt_us == 0 || rtt < e.min_rtt_us)) {
            e.verdict = Some(&f.verdict);
        }
        e.min_rtt_us = match (e.min_rtt_us, rtt) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        };
        if f.verdict.contested {
            e.contested = true;
        }
        if !f.verdict.operator_country.is_empty() {
            e.operator_country = &f.verdict.operator_country;
        }
        let (ct, unmeasured) = super::measurement_columns(fl);
        e.conntrack_bytes = e
            .conntrack_bytes
            .saturating_add(to_i64(ct, "conntrack bytes")?);
        e.unmeasured_flows = e
            .unmeasured_flows
            .saturating_add(to_i64(unmeasured, "unmeasured flows")?);
    }
    Ok(())
}

/// A report's raw foreign flows as one `foreign_flows` row: its flows to destinations outside
/// the node's declared country, in report order, encoded as one protobuf `Report` that carries
/// only them (the agent's own message, so any reader of reports decodes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ForeignFlows {
    /// Earliest start among them (their end when a flow has no start).
    pub start_ms: i64,
    /// Latest end among them.
    pub end_ms: i64,
    /// How many flows.
    pub flow_count: i64,
    /// Their destination countries, distinct, sorted, comma-separated ("" for unknown ones is
    /// left out).
    pub countries: String,
    /// `Report { flows }`, protobuf.
    pub flows: Vec<u8>,
}

/// `r`'s raw foreign flows; `None` when every flow stayed in the node's country.
pub(crate) fn foreign_flows(r: &IncomingReport) -> Option<ForeignFlows> {
    // `Report.flows` is field 10: each flow encoded as that field is exactly
    // `Report { flows, .. }` encoded, without copying the flows first.
    const REPORT_FLOWS_FIELD: u32 = 10;
    let mut flows = Vec::new();
    let mut countries = std::collections::BTreeSet::new();
    let (mut start_ms, mut end_ms, mut flow_count) = (i64::MAX, i64::MIN, 0i64);
    for f in &r.telemetry.flows {
        if *f.country == *r.country {
            continue;
        }
        let end = flow_end(r, &f.flow);
        let start = if f.flow.start_unix_ms > 0 {
            f.flow.start_unix_ms
        } else {
            end
        };
        start_ms = start_ms.min(start);
        end_ms = end_ms.max(end);
        if !f.country.is_empty() {
            countries.insert(&*f.country);
        }
        prost::encoding::message::encode(REPORT_FLOWS_FIELD, &f.flow, &mut flows);
        flow_count += 1;
    }
    if flow_count == 0 {
        return None;
    }
    Some(ForeignFlows {
        start_ms,
        end_ms,
        flow_count,
        countries: countries.into_iter().collect::<Vec<_>>().join(","),
        flows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FlowRecord;
    use sov_proto::pb;

    fn flow(remote: &str, country: &str, start: i64, end: i64) -> FlowRecord {
        FlowRecord {
            flow: pb::Flow {
                remote_address: remote.into(),
                start_unix_ms: start,
                end_unix_ms: end,
                bytes_sent: 7,
                ..Default::default()
            },
            process: Default::default(),
            country: country.into(),
            asn: 0,
            org: Default::default(),
            geo_source: Default::default(),
            verdict: VerdictColumns::default(),
        }
    }

    #[test]
    fn a_reports_foreign_flows_are_one_row_that_decodes_to_them_in_order() {
        let mut r = crate::store::suite::report("n", 1, 3);
        r.telemetry.flows = vec![
            flow("9.9.9.9", "US", 1_000, 5_000),
            flow("10.0.0.1", "MA", 500, 9_000),
            flow("8.8.4.4", "DE", 0, 0),
            flow("1.1.1.1", "US", 2_000, 4_000),
            flow("2.2.2.2", "", 2_000, 4_000),
        ];
        let f = foreign_flows(&r).unwrap();
        assert_eq!(f.flow_count, 4);
        assert_eq!(f.countries, "DE,US");
        // A flow without times counts at the report's observation time (3,000 here).
        assert_eq!((f.start_ms, f.end_ms), (1_000, 5_000));
        let decoded = <pb::Report as prost::Message>::decode(f.flows.as_slice()).unwrap();
        let remotes: Vec<&str> = decoded
            .flows
            .iter()
            .map(|f| f.remote_address.as_str())
            .collect();
        assert_eq!(remotes, ["9.9.9.9", "8.8.4.4", "1.1.1.1", "2.2.2.2"]);
        assert_eq!(decoded.flows[0], r.telemetry.flows[0].flow);
        assert_eq!(prost::Message::encode_to_vec(&decoded), f.flows);
        r.telemetry.flows.retain(|f| &*f.country == "MA");
        assert_eq!(foreign_flows(&r), None);
    }
}
