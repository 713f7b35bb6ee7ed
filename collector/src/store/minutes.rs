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
