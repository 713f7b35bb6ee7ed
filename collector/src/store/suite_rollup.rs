//! The store suite's hourly rollup behaviours (issue 14, queries at volume), run on every
//! backend by [`super::suite::store_suite!`]: hour rows hold exactly the minute rows' totals,
//! and every question asked before a rollup gets the same answer after it, for ranges that
//! span rolled-up hours and fresh minutes, also when a late report lands in a rolled-up hour.

use std::collections::BTreeSet;

use sov_proto::pb;

use super::rollup::HOUR_MS;
use super::suite::{Backend, ingest, report, telemetry};
use super::{EgressQuery, FlowRecord, IngestOutcome, Store};

/// An outbound flow of `pid` to `remote`, placed in `country` / `asn`, ending at `end_ms`.
pub(super) fn flow(
    pid: u32,
    process: &str,
    remote: &str,
    country: &str,
    asn: u32,
    sent: u64,
    end_ms: i64,
) -> FlowRecord {
    FlowRecord {
        flow: pb::Flow {
            protocol: pb::Protocol::Tcp as i32,
            remote_address: remote.into(),
            remote_port: 443,
            pid,
            bytes_sent: sent,
            bytes_received: sent / 10,
            direction: pb::Direction::Outbound as i32,
            min_rtt_us: 900 + u32::try_from(sent % 100).unwrap_or(0),
            connections: 1,
            start_unix_ms: end_ms - 10_000,
            end_unix_ms: end_ms,
            ..Default::default()
        },
        process: process.into(),
        country: country.into(),
        asn,
        org: format!("AS{asn}").into(),
        geo_source: "test-db".into(),
        verdict: crate::store::VerdictColumns {
            answers_json: format!(
                r#"[{{"source":"test-db","country":"{country}","kind":"registry","impossible":false,"distance_km":0}}]"#
            ).into(),
            contested: remote == "203.0.113.9",
            ..Default::default()
        },
    }
}

/// Reports of nodes a and b every 20 minutes over 6 hours, each with flows to a few
/// destinations and GPU usage (`telemetry()`: 7.5 GPU-seconds to vllm, pid 4242).
async fn write(store: &dyn Store) {
    let dests = [
        ("192.0.2.1", "US", 13335),
        ("192.0.2.2", "US", 15169),
        ("198.51.100.7", "FR", 3215),
        ("203.0.113.9", "DE", 3320),
        ("10.0.0.1", "MA", 0),
    ];
    for node in ["a", "b"] {
        for k in 0..18u64 {
            // Observed at 20-minute steps, 7 minutes past: reports are not hour-aligned.
            let seq = 420 + k * 1200;
            let mut r = report(node, 1, seq);
            r.telemetry = telemetry();
            let at = r.observed_unix_ms;
            r.telemetry.flows = dests
                .iter()
                .enumerate()
                .map(|(i, (addr, country, asn))| {
                    let pid = if i % 2 == 0 { 10 } else { 20 };
                    let process = if pid == 10 { "vllm" } else { "curl" };
                    let sent = 1000 * (k + 1) + 37 * i as u64 + u64::from(node == "b");
                    flow(
                        pid,
                        process,
                        addr,
                        country,
                        *asn,
                        sent,
                        at - 1000 * i as i64,
                    )
                })
                .collect();
            assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
        }
    }
}

/// Every answer the hour rows may serve, for one range, in a comparable order.
async fn answers(store: &dyn Store, since: i64, until: i64) -> Vec<String> {
    let mut out = Vec::new();
    for by in [
        "country",
        "node",
        "process",
        "asn",
        "verdict",
        "contested",
        "flow",
    ] {
        let (mut rows, left_out) = store
            .egress(EgressQuery {
                since_unix_ms: since,
                until_unix_ms: until,
                by: by.into(),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        rows.sort_by_key(|r| format!("{r:?}"));
        out.push(format!("{by} left out {left_out}: {rows:?}"));
    }
    let mut gpu = store.gpu_usage(since, until, 1000).await.unwrap();
    gpu.sort_by_key(|g| format!("{g:?}"));
    out.push(format!("gpu: {gpu:?}"));
    out
}

/// The ranges asked: all of it, one starting and ending inside hours and spanning rolled-up
/// hours and fresh minutes, one inside the rolled-up hours only, one inside one hour.
const RANGES: [(i64, i64); 4] = [
    (0, 7 * HOUR_MS),
    (HOUR_MS + 17 * 60_000 + 5, 4 * HOUR_MS + 30 * 60_000),
    (HOUR_MS, 3 * HOUR_MS),
    (2 * HOUR_MS + 60_000, 2 * HOUR_MS + 50 * 60_000),
];

/// Hour rows' totals against the minute and raw rows' totals before `end`.
pub(super) async fn assert_totals_equal(db: &dyn Backend, end: i64) {
    for col in [
        "bytes_sent",
        "bytes_received",
        "connections",
        "conntrack_bytes",
    ] {
        let minutes = db
            .count(&format!(
                "SELECT CAST(COALESCE(SUM({col}), 0) AS BIGINT) FROM flows_minute WHERE minute_ms < {end}"
            ))
            .await;
        let hours = db
            .count(&format!(
                "SELECT CAST(COALESCE(SUM({col}), 0) AS BIGINT) FROM flows_hour"
            ))
            .await;
        assert_eq!(hours, minutes, "{col}: hour rows against minute rows");
    }
    let raw = db
        .count(&format!(
            "SELECT CAST(ROUND(COALESCE(SUM(gpu_seconds), 0) * 1000) AS BIGINT) FROM gpu_usage WHERE observed_ms < {end}"
        ))
        .await;
    let hours = db
        .count("SELECT CAST(ROUND(COALESCE(SUM(gpu_seconds), 0) * 1000) AS BIGINT) FROM gpu_usage_hour")
        .await;
    assert_eq!(hours, raw, "GPU milliseconds: hour rows against raw rows");
}

pub(crate) async fn hour_rows_total_the_minutes_and_answers_are_the_same_after_a_rollup(
    db: &dyn Backend,
) {
    let store = db.store();
    write(store).await;
    let mut before = Vec::new();
    for (since, until) in RANGES {
        before.push(answers(store, since, until).await);
    }
    // First to the middle of hour 2 (its row holds half an hour), then on to hour 4: hours
    // 0..2, the half, then the rest of hour 2 and hour 3, each part with rows.
    let half = 2 * HOUR_MS + 30 * 60_000;
    let stats = store.roll_up(half + 59_000).await.unwrap();
    assert_eq!((stats.hours, stats.up_to_unix_ms), (3, half), "{stats:?}");
    assert_totals_equal(db, half).await;
    for ((since, until), want) in RANGES.into_iter().zip(&before) {
        assert_eq!(
            &answers(store, since, until).await,
            want,
            "[{since}, {until}) after the rollup to the middle of an hour"
        );
    }
    let stats = store.roll_up(4 * HOUR_MS + 59_000).await.unwrap();
    assert_eq!(stats.hours, 2, "{stats:?}");
    assert_eq!(stats.up_to_unix_ms, 4 * HOUR_MS);
    assert!(stats.flow_rows > 0 && stats.gpu_rows > 0, "{stats:?}");
    assert!(db.count("SELECT COUNT(*) FROM flows_hour").await > 0);
    assert_totals_equal(db, 4 * HOUR_MS).await;
    for ((since, until), want) in RANGES.into_iter().zip(&before) {
        assert_eq!(
            &answers(store, since, until).await,
            want,
            "[{since}, {until}) after the rollup"
        );
    }
    // Again: nothing more to do, nothing doubled.
    assert_eq!(store.roll_up(4 * HOUR_MS).await.unwrap().hours, 0);
    assert_totals_equal(db, 4 * HOUR_MS).await;

    // A late report for hour 1: a flow merging into an existing minute row (same key), a new
    // destination, and GPU usage; derived after its hour was rolled up.
    let late_at = HOUR_MS + 27 * 60_000 + 500;
    let mut late = report("a", 1, 5);
    late.observed_unix_ms = late_at;
    late.received_unix_ms = 9 * HOUR_MS;
    late.telemetry = telemetry();
    late.telemetry.flows = vec![
        flow(10, "vllm", "192.0.2.1", "US", 13335, 5_000, late_at),
        flow(20, "curl", "192.0.2.77", "JP", 2497, 7_000, late_at),
    ];
    assert_eq!(ingest(store, late).await, IngestOutcome::Stored);
    assert_totals_equal(db, 4 * HOUR_MS).await;
    let (country, _) = store
        .egress(EgressQuery {
            since_unix_ms: 0,
            until_unix_ms: 4 * HOUR_MS,
            by: "country".into(),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let jp: u64 = country
        .iter()
        .filter(|r| r.country == "JP")
        .map(|r| r.bytes_sent)
        .sum();
    assert_eq!(
        jp, 7_000,
        "the late flow is in the rolled-up answer: {country:?}"
    );
    // Every answer after the late report equals the same answer with nothing rolled up: the
    // minute rows alone (asked through groupings and ranges that read no hour rows).
    let (flows, _) = store
        .egress(EgressQuery {
            since_unix_ms: 0,
            until_unix_ms: 4 * HOUR_MS,
            by: "flow".into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let by_flow: u64 = flows.iter().map(|r| r.bytes_sent).sum();
    let by_country: u64 = country.iter().map(|r| r.bytes_sent).sum();
    assert_eq!(
        by_country, by_flow,
        "hours and minutes agree after a late report"
    );
    let gpu_hours: f64 = store
        .gpu_usage(0, 4 * HOUR_MS, 100)
        .await
        .unwrap()
        .iter()
        .map(|g| g.gpu_seconds)
        .sum();
    // 2 nodes x 12 reports in hours 0..4, plus the late one: 7.5 GPU-seconds each.
    assert!((gpu_hours - 25.0 * 7.5).abs() < 1e-6, "{gpu_hours}");
}

/// Reports of nodes a and b every 3 hours 7 minutes over three and a half days (flows as in
/// [`write`]), so that whole days roll up.
pub(super) async fn write_days(store: &dyn Store) {
    let dests = [
        ("192.0.2.1", "US", 13335),
        ("198.51.100.7", "FR", 3215),
        ("203.0.113.9", "DE", 3320),
    ];
    for node in ["a", "b"] {
        for k in 0..27u64 {
            let seq = 420 + k * (3 * 3600 + 420);
            let mut r = report(node, 1, seq);
            r.telemetry = telemetry();
            let at = r.observed_unix_ms;
            r.telemetry.flows = dests
                .iter()
                .enumerate()
                .map(|(i, (addr, country, asn))| {
                    let pid = if i % 2 == 0 { 10 } else { 20 };
                    let process = if pid == 10 { "vllm" } else { "curl" };
                    let sent = 1000 * (k + 1) + 37 * i as u64 + u64::from(node == "b");
                    flow(
                        pid,
                        process,
                        addr,
                        country,
                        *asn,
                        sent,
                        at - 1000 * i as i64,
                    )
                })
                .collect();
            assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
        }
    }
}

/// The answers hour and day rows serve (the groupings without address or container).
async fn rolled_answers(store: &dyn Store, since: i64, until: i64) -> Vec<String> {
    let mut all = answers(store, since, until).await;
    all.retain(|a| !a.starts_with("contested") && !a.starts_with("flow"));
    all
}

/// Day rows' totals against the minute and raw rows' totals before `end`.
pub(super) async fn assert_day_totals_equal(db: &dyn Backend, end: i64) {
    for col in ["bytes_sent", "bytes_received", "connections"] {
        let minutes = db
            .count(&format!(
                "SELECT CAST(COALESCE(SUM({col}), 0) AS BIGINT) FROM flows_minute WHERE minute_ms < {end}"
            ))
            .await;
        let days = db
            .count(&format!(
                "SELECT CAST(COALESCE(SUM({col}), 0) AS BIGINT) FROM flows_day"
            ))
            .await;
        assert_eq!(days, minutes, "{col}: day rows against minute rows");
    }
    let raw = db
        .count(&format!(
            "SELECT CAST(ROUND(COALESCE(SUM(gpu_seconds), 0) * 1000) AS BIGINT) FROM gpu_usage WHERE observed_ms < {end}"
        ))
        .await;
    let days = db
        .count(
            "SELECT CAST(ROUND(COALESCE(SUM(gpu_seconds), 0) * 1000) AS BIGINT) FROM gpu_usage_day",
        )
        .await;
    assert_eq!(days, raw, "GPU milliseconds: day rows against raw rows");
}

/// The ranges asked of [`write_days`]' store: all of it; mid-hour on day 1 to mid-hour on
/// day 3 (minutes, hours, a day, hours, minutes); whole days; inside one day.
const DAY_RANGES: [(i64, i64); 4] = {
    let d = super::rollup::DAY_MS;
    [
        (0, 4 * d),
        (
            d + 5 * HOUR_MS + 17 * 60_000 + 5,
            3 * d + 2 * HOUR_MS + 60_000,
        ),
        (d, 3 * d),
        (2 * d + 60_000, 2 * d + 50 * 60_000),
    ]
};

pub(crate) async fn day_rows_total_the_minutes_and_answers_survive_the_minutes(db: &dyn Backend) {
    use super::Retention;
    use super::rollup::DAY_MS;
    let store = db.store();
    write_days(store).await;
    let d = DAY_MS;
    let ranges = DAY_RANGES;
    let mut before = Vec::new();
    for (since, until) in ranges {
        before.push(answers(store, since, until).await);
    }
    // Minutes to 5 h into day 3, whole days 0..3 and day 3 so far into day rows.
    let rolled = 3 * d + 5 * HOUR_MS;
    let stats = store.roll_up(rolled + 59_000).await.unwrap();
    assert_eq!(stats.up_to_unix_ms, rolled, "{stats:?}");
    assert_eq!(
        (stats.days, stats.days_up_to_unix_ms),
        (4, rolled),
        "{stats:?}"
    );
    assert!(stats.day_rows > 0, "{stats:?}");
    assert_day_totals_equal(db, rolled).await;
    for ((since, until), want) in ranges.into_iter().zip(&before) {
        assert_eq!(
            &answers(store, since, until).await,
            want,
            "[{since}, {until}) after the daily rollup"
        );
    }
    assert_eq!(store.roll_up(rolled).await.unwrap().days, 0);
    assert_day_totals_equal(db, rolled).await;

    // A late report in day 1, derived after that day was rolled up: it reaches the hour and
    // the day rows in its own transaction.
    let late_at = d + 7 * HOUR_MS + 27 * 60_000 + 500;
    let mut late = report("a", 1, 5);
    late.observed_unix_ms = late_at;
    late.received_unix_ms = 4 * d;
    late.telemetry = telemetry();
    late.telemetry.flows = vec![
        flow(10, "vllm", "192.0.2.1", "US", 13335, 5_000, late_at),
        flow(20, "curl", "192.0.2.77", "JP", 2497, 7_000, late_at),
    ];
    assert_eq!(ingest(store, late).await, IngestOutcome::Stored);
    assert_day_totals_equal(db, rolled).await;
    assert_totals_equal(db, rolled).await;
    let mut after_late = Vec::new();
    for (since, until) in ranges {
        after_late.push(rolled_answers(store, since, until).await);
    }
    assert!(
        after_late[2].iter().any(|a| a.contains("JP")),
        "the late flow is in the day rows' answer: {:?}",
        after_late[2]
    );

    // Minutes kept two days, hours one: what goes was rolled up, and every answer the
    // rolled-up rows serve is unchanged.
    store
        .prune(Retention {
            raw_before_unix_ms: 0,
            aggregates_before_unix_ms: 0,
            minutes_before_unix_ms: 2 * d,
            hours_before_unix_ms: d,
        })
        .await
        .unwrap();
    assert_eq!(
        db.count(&format!(
            "SELECT COUNT(*) FROM flows_minute WHERE minute_ms < {}",
            2 * d
        ))
        .await,
        0
    );
    assert!(db.count("SELECT COUNT(*) FROM flows_minute").await > 0);
    assert_eq!(
        db.count(&format!(
            "SELECT COUNT(*) FROM flows_hour WHERE hour_ms < {d}"
        ))
        .await,
        0
    );
    // Every range but the one starting in day 1's pruned minutes (its first 43 minutes are
    // gone): whole days, days then fresh hours and minutes, minutes of day 2.
    for (i, (since, until)) in ranges.into_iter().enumerate() {
        if i != 1 {
            assert_eq!(
                rolled_answers(store, since, until).await,
                after_late[i],
                "[{since}, {until}) after minutes and hours went"
            );
        }
    }
    // A cut-off past where the rollups came keeps what is not rolled up yet, and the
    // answers over it are still whole (day rows, then the minutes left).
    store
        .prune(Retention {
            raw_before_unix_ms: 0,
            aggregates_before_unix_ms: 0,
            minutes_before_unix_ms: 9 * d,
            hours_before_unix_ms: 9 * d,
        })
        .await
        .unwrap();
    assert_eq!(
        db.count(&format!(
            "SELECT COUNT(*) FROM flows_minute WHERE minute_ms < {rolled}"
        ))
        .await,
        0
    );
    assert!(
        db.count(&format!(
            "SELECT COUNT(*) FROM flows_minute WHERE minute_ms >= {rolled}"
        ))
        .await
            > 0
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM flows_hour").await, 0);
    assert_eq!(rolled_answers(store, 0, 4 * d).await, after_late[0]);
}

/// Rows of the fleet table of a level that differ from the sums of its node-level table
/// (grouped by the node's site and declared country, destination country, ASN and verdict),
/// plus the difference in row counts: 0 when every fleet row is exactly the sums.
async fn fleet_mismatches(db: &dyn Backend, level: &str) -> i64 {
    let t = if level == "hour" { "hour_ms" } else { "day_ms" };
    let grouped = format!(
        "SELECT r.{t} AS t, COALESCE(n.site, '') AS s, COALESCE(n.country, '') AS c,
                r.direction AS d, r.country AS dc, r.asn AS a, r.answers AS an, r.contested AS co,
                r.operator_country AS oc, r.physics AS ph, MIN(r.node) AS node, MAX(r.org) AS org,
                SUM(r.bytes_sent) AS bs, SUM(r.bytes_received) AS br, SUM(r.connections) AS cn,
                SUM(r.conntrack_bytes) AS ct, SUM(r.unmeasured_flows) AS uf,
                COALESCE(MIN(NULLIF(r.min_rtt_us, 0)), 0) AS rtt, MAX(r.distance_km) AS dk,
                COALESCE(MIN(NULLIF(r.limit_km, 0)), 0) AS lk
         FROM flows_{level} r LEFT JOIN nodes n ON n.node = r.node
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10"
    );
    let differ = db
        .count(&format!(
            "SELECT COUNT(*) FROM ({grouped}) g
             LEFT JOIN fleet_{level} f ON f.{t} = g.t AND f.node_site = g.s AND f.node_country = g.c
                  AND f.direction = g.d AND f.country = g.dc AND f.asn = g.a AND f.answers = g.an
                  AND f.contested = g.co AND f.operator_country = g.oc AND f.physics = g.ph
             WHERE f.node IS NULL OR f.node <> g.node OR f.org <> g.org OR f.bytes_sent <> g.bs
                OR f.bytes_received <> g.br OR f.connections <> g.cn OR f.conntrack_bytes <> g.ct
                OR f.unmeasured_flows <> g.uf OR f.min_rtt_us <> g.rtt OR f.distance_km <> g.dk
                OR f.limit_km <> g.lk"
        ))
        .await;
    let groups = db
        .count(&format!("SELECT COUNT(*) FROM ({grouped}) g"))
        .await;
    let rows = db
        .count(&format!("SELECT COUNT(*) FROM fleet_{level}"))
        .await;
    differ + (rows - groups).abs()
}

/// Rest-of-day rows that differ from the sums of the hour rows from their start to the end
/// of its day (for the days rolled up into day rows), plus the difference in row counts.
async fn rest_mismatches(db: &dyn Backend) -> i64 {
    let grouped = "SELECT h.node AS n, h.hour_ms - (h.hour_ms % 86400000) + k.k * 3600000 AS f,
                h.pid AS p, h.process AS pr, h.direction AS d, h.country AS dc, h.asn AS a,
                h.answers AS an, h.contested AS co, h.operator_country AS oc, h.physics AS ph,
                SUM(h.bytes_sent) AS bs, SUM(h.bytes_received) AS br, SUM(h.connections) AS cn,
                SUM(h.conntrack_bytes) AS ct, SUM(h.unmeasured_flows) AS uf,
                COALESCE(MIN(NULLIF(h.min_rtt_us, 0)), 0) AS rtt
         FROM flows_hour h JOIN day_hours k ON k.k * 3600000 <= h.hour_ms % 86400000
         WHERE h.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11";
    let differ = db
        .count(&format!(
            "SELECT COUNT(*) FROM ({grouped}) g
             LEFT JOIN flows_rest r ON r.node = g.n AND r.from_ms = g.f AND r.pid = g.p
                  AND r.process = g.pr AND r.direction = g.d AND r.country = g.dc AND r.asn = g.a
                  AND r.answers = g.an AND r.contested = g.co AND r.operator_country = g.oc
                  AND r.physics = g.ph
             WHERE r.node IS NULL OR r.bytes_sent <> g.bs OR r.bytes_received <> g.br
                OR r.connections <> g.cn OR r.conntrack_bytes <> g.ct OR r.unmeasured_flows <> g.uf
                OR r.min_rtt_us <> g.rtt"
        ))
        .await;
    let groups = db
        .count(&format!("SELECT COUNT(*) FROM ({grouped}) g"))
        .await;
    let rows = db.count("SELECT COUNT(*) FROM flows_rest").await;
    differ + (rows - groups).abs()
}

/// Fleet rest-of-day rows that differ from the sums of the fleet hour rows from their start
/// to the end of its day (days rolled up into day rows), plus the difference in row counts.
async fn fleet_rest_mismatches(db: &dyn Backend) -> i64 {
    let grouped =
        "SELECT h.hour_ms - (h.hour_ms % 86400000) + k.k * 3600000 AS f, h.node_site AS s,
                h.node_country AS c, h.direction AS d, h.country AS dc, h.asn AS a,
                h.answers AS an, h.contested AS co, h.operator_country AS oc, h.physics AS ph,
                MIN(h.node) AS n, SUM(h.bytes_sent) AS bs, SUM(h.bytes_received) AS br,
                SUM(h.connections) AS cn, SUM(h.conntrack_bytes) AS ct,
                SUM(h.unmeasured_flows) AS uf, COALESCE(MIN(NULLIF(h.min_rtt_us, 0)), 0) AS rtt
         FROM fleet_hour h JOIN day_hours k ON k.k * 3600000 <= h.hour_ms % 86400000
         WHERE h.hour_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'daily')
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10";
    let differ = db
        .count(&format!(
            "SELECT COUNT(*) FROM ({grouped}) g
             LEFT JOIN fleet_rest r ON r.from_ms = g.f AND r.node_site = g.s
                  AND r.node_country = g.c AND r.direction = g.d AND r.country = g.dc
                  AND r.asn = g.a AND r.answers = g.an AND r.contested = g.co
                  AND r.operator_country = g.oc AND r.physics = g.ph
             WHERE r.node IS NULL OR r.node <> g.n OR r.bytes_sent <> g.bs
                OR r.bytes_received <> g.br OR r.connections <> g.cn OR r.conntrack_bytes <> g.ct
                OR r.unmeasured_flows <> g.uf OR r.min_rtt_us <> g.rtt"
        ))
        .await;
    let groups = db
        .count(&format!("SELECT COUNT(*) FROM ({grouped}) g"))
        .await;
    let rows = db.count("SELECT COUNT(*) FROM fleet_rest").await;
    differ + (rows - groups).abs()
}

/// Fleet hour and day rows against their node-level tables, and rest-of-day rows (node and
/// fleet) against the hour rows.
pub(super) async fn assert_fleet_is_the_sum(db: &dyn Backend, when: &str) {
    for level in ["hour", "day"] {
        assert_eq!(
            fleet_mismatches(db, level).await,
            0,
            "fleet_{level} against the sums of flows_{level} {when}"
        );
    }
    assert_eq!(
        rest_mismatches(db).await,
        0,
        "flows_rest against the sums of flows_hour {when}"
    );
    assert_eq!(
        fleet_rest_mismatches(db).await,
        0,
        "fleet_rest against the sums of fleet_hour {when}"
    );
}

pub(crate) async fn fleet_rows_are_the_sums_of_the_node_rows_through_rollups_late_rows_and_retention(
    db: &dyn Backend,
) {
    use super::Retention;
    use super::rollup::DAY_MS;
    let store = db.store();
    let d = DAY_MS;
    // Nodes a and b in Rabat; node c in Paris, declared FR, sending to the same destinations.
    write_days(store).await;
    for k in 0..9u64 {
        let seq = 1800 + k * (9 * 3600 + 60);
        let mut r = report("c", 1, seq);
        r.site = "paris-1".into();
        r.country = "FR".into();
        let at = r.observed_unix_ms;
        r.telemetry.flows = vec![
            flow(30, "curl", "192.0.2.1", "US", 13335, 4_000 + k, at),
            flow(30, "curl", "203.0.113.9", "DE", 3320, 900 + k, at - 500),
        ];
        assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    }
    let ranges = [
        (0, 4 * d),
        (d + 5 * HOUR_MS, 3 * d + 2 * HOUR_MS),
        (d, 3 * d),
    ];
    let mut before = Vec::new();
    for (since, until) in ranges {
        before.push(rolled_answers(store, since, until).await);
    }
    // Nothing rolled up: no fleet rows either.
    assert_eq!(db.count("SELECT COUNT(*) FROM fleet_hour").await, 0);

    // To the middle of an hour (the current hour's row grows), then on into day 3.
    let half = d + 10 * HOUR_MS + 30 * 60_000;
    store.roll_up(half + 59_000).await.unwrap();
    assert!(db.count("SELECT COUNT(*) FROM fleet_hour").await > 0);
    assert_fleet_is_the_sum(db, "after a rollup to the middle of an hour").await;
    let rolled = 3 * d + 5 * HOUR_MS;
    store.roll_up(rolled + 59_000).await.unwrap();
    assert!(db.count("SELECT COUNT(*) FROM fleet_day").await > 0);
    assert!(db.count("SELECT COUNT(*) FROM flows_rest").await > 0);
    assert!(db.count("SELECT COUNT(*) FROM fleet_rest").await > 0);
    assert_fleet_is_the_sum(db, "after the daily rollup").await;
    // Fleet rows are fewer than the node rows they sum (nodes a and b share a site).
    assert!(
        db.count("SELECT COUNT(*) FROM fleet_hour").await
            < db.count("SELECT COUNT(*) FROM flows_hour").await
    );
    // The answers the fleet rows now serve are the minutes' answers.
    for ((since, until), want) in ranges.into_iter().zip(&before) {
        assert_eq!(
            &rolled_answers(store, since, until).await,
            want,
            "[{since}, {until}) from fleet rows"
        );
    }

    // Late reports into rolled-up day 1 of node a (Rabat) and node c (Paris): one merging
    // into an existing minute row (the update path), one to a new destination (insert).
    let late_at = d + 7 * HOUR_MS + 27 * 60_000 + 500;
    for (node, seq, site, country) in [("a", 5, "rabat-1", "MA"), ("c", 7, "paris-1", "FR")] {
        let mut late = report(node, 1, seq);
        late.site = site.into();
        late.country = country.into();
        late.observed_unix_ms = late_at;
        late.received_unix_ms = 4 * d;
        late.telemetry.flows = vec![
            flow(10, "vllm", "192.0.2.1", "US", 13335, 5_000, late_at),
            flow(20, "curl", "192.0.2.77", "JP", 2497, 7_000, late_at),
        ];
        assert_eq!(ingest(store, late).await, IngestOutcome::Stored);
    }
    // A minute row of hour 8 of day 1 merged with a later flow of the same key.
    let merge_at = d + 8 * HOUR_MS + 7 * 60_000 + 100;
    for (seq, at, sent) in [(6, merge_at, 11_000), (8, merge_at + 1_000, 13_000)] {
        let mut merge = report("b", 1, seq);
        merge.observed_unix_ms = at;
        merge.received_unix_ms = 4 * d;
        merge.telemetry.flows = vec![flow(10, "vllm", "192.0.2.1", "US", 13335, sent, at)];
        assert_eq!(ingest(store, merge).await, IngestOutcome::Stored);
    }
    assert_fleet_is_the_sum(db, "after late reports").await;
    // From 05:00 on day 1 by process: the rest of day 1 from its rest-of-day rows, then day 2,
    // against the same sums from hour rows (a range ending inside day 1, then day 2 alone).
    let by_process = |since: i64, until: i64| async move {
        let (rows, _) = store
            .egress(EgressQuery {
                since_unix_ms: since,
                until_unix_ms: until,
                by: "process".into(),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        rows.iter().map(|r| r.bytes_sent).sum::<u64>()
    };
    assert_eq!(
        by_process(d + 5 * HOUR_MS, 3 * d).await,
        by_process(d + 5 * HOUR_MS, 2 * d - 1).await + by_process(2 * d - 1, 3 * d).await,
        "rest-of-day rows hold the late reports"
    );
    let (country, _) = store
        .egress(EgressQuery {
            since_unix_ms: d,
            until_unix_ms: 2 * d,
            by: "country".into(),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let jp: u64 = country
        .iter()
        .filter(|r| r.country == "JP")
        .map(|r| r.bytes_sent)
        .sum();
    assert_eq!(
        jp, 14_000,
        "both late flows in the fleet day row: {country:?}"
    );
    // Day 1 by flow (minute rows only) and by country (fleet day row) agree.
    let (flows, _) = store
        .egress(EgressQuery {
            since_unix_ms: d,
            until_unix_ms: 2 * d,
            by: "flow".into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        country.iter().map(|r| r.bytes_sent).sum::<u64>(),
        flows.iter().map(|r| r.bytes_sent).sum::<u64>(),
        "fleet rows and minutes agree after late reports"
    );

    // Retention: hours before day 2 go (rolled into days), fleet hours with them; the fleet
    // rows left are still the sums of the node rows left.
    store
        .prune(Retention {
            raw_before_unix_ms: 0,
            aggregates_before_unix_ms: 0,
            minutes_before_unix_ms: 2 * d,
            hours_before_unix_ms: 2 * d,
        })
        .await
        .unwrap();
    assert_eq!(
        db.count(&format!(
            "SELECT COUNT(*) FROM fleet_hour WHERE hour_ms < {}",
            2 * d
        ))
        .await,
        0
    );
    assert!(db.count("SELECT COUNT(*) FROM fleet_hour").await > 0);
    assert_fleet_is_the_sum(db, "after hours were pruned").await;
    // Day rows before day 1 go with the aggregates' cut-off, fleet days with them.
    store.prune(Retention::all_before(d)).await.unwrap();
    assert_eq!(
        db.count(&format!(
            "SELECT COUNT(*) FROM fleet_day WHERE day_ms < {d}"
        ))
        .await,
        0
    );
    assert_fleet_is_the_sum(db, "after days were pruned").await;
}

/// The groupings SQLite sums in the collector over rollups (`node`, `process`, `country`,
/// `asn`, `contested`; PostgreSQL groups them in SQL) over a range read from rollups (minutes
/// at both ends, hour rows between): the same groups and sums as from minutes alone, largest
/// `bytes_sent` first, and with a limit the largest groups and the number left out.
pub(crate) async fn node_level_groupings_over_rollups_list_the_largest_first_and_count_the_rest(
    db: &dyn Backend,
) {
    let store = db.store();
    write(store).await;
    let (since, until) = (HOUR_MS + 17 * 60_000 + 5, 4 * HOUR_MS + 30 * 60_000);
    let ask = |by: &'static str, limit: u32| {
        store.egress(EgressQuery {
            since_unix_ms: since,
            until_unix_ms: until,
            by: by.into(),
            limit,
            ..Default::default()
        })
    };
    let groupings = ["process", "node", "country", "asn"];
    let mut minutes = Vec::new();
    for by in groupings {
        minutes.push(ask(by, 1000).await.unwrap().0);
    }
    let stats = store
        .roll_up(2 * HOUR_MS + 30 * 60_000 + 59_000)
        .await
        .unwrap();
    assert_eq!(stats.up_to_unix_ms, 2 * HOUR_MS + 30 * 60_000, "{stats:?}");
    let (country, _) = ask("country", 1000).await.unwrap();
    let total: u64 = country.iter().map(|r| r.bytes_sent).sum();
    assert!(total > 0);
    for (by, from_minutes) in groupings.into_iter().zip(minutes) {
        let (all, left_out) = ask(by, 1000).await.unwrap();
        assert_eq!(left_out, 0, "{by}");
        let groups = match by {
            "process" => 10,
            "node" => 8,
            _ => from_minutes.len(),
        };
        assert!(groups >= 2, "{by}: {from_minutes:?}");
        assert_eq!(all.len(), groups, "{by}: {all:?}");
        let mut a = all.clone();
        let mut b = from_minutes.clone();
        a.sort_by_key(|r| format!("{r:?}"));
        b.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(a, b, "{by}: the same groups and sums as from minutes alone");
        if by != "contested" {
            assert_eq!(
                all.iter().map(|r| r.bytes_sent).sum::<u64>(),
                total,
                "{by}: every byte once"
            );
        }
        assert!(
            all.windows(2).all(|w| w[0].bytes_sent >= w[1].bytes_sent),
            "{by}: largest first: {all:?}"
        );
        assert!(all.iter().all(|r| r.min_rtt_us >= 900));
        assert!(
            all.iter().all(|r| !r.node.is_empty()) || matches!(by, "country" | "asn"),
            "{by}: {all:?}"
        );
        let (top, left_out) = ask(by, 2).await.unwrap();
        assert_eq!(top, all[..2].to_vec(), "{by}: the two largest");
        assert_eq!(left_out, groups as u64 - 2, "{by}: the others counted");
    }
    // `contested` is per place (a node's site and declared country), as `verdict` is: a and
    // b share theirs, so one row for the one contested destination, naming the least node,
    // with both nodes' bytes; the same before and after the rollup.
    let (contested, left_out) = ask("contested", 1000).await.unwrap();
    assert_eq!(left_out, 0);
    assert_eq!(contested.len(), 1, "{contested:?}");
    assert_eq!(
        (
            contested[0].node.as_str(),
            contested[0].remote_address.as_str()
        ),
        ("a", "203.0.113.9")
    );
    let (flows, _) = ask("flow", 1000).await.unwrap();
    let to_it: Vec<_> = flows
        .iter()
        .filter(|r| r.remote_address == "203.0.113.9")
        .collect();
    assert_eq!(
        to_it
            .iter()
            .map(|r| r.node.as_str())
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["a", "b"])
    );
    assert_eq!(
        contested[0].bytes_sent,
        to_it.iter().map(|r| r.bytes_sent).sum::<u64>()
    );
    // b moves to another site (its latest report says so): two places, one row each.
    let mut moved = report("b", 1, 420 + 18 * 1200);
    moved.site = "casa-1".into();
    assert_eq!(ingest(store, moved).await, IngestOutcome::Stored);
    let (mut contested, _) = ask("contested", 1000).await.unwrap();
    contested.sort_by(|x, y| x.node.cmp(&y.node));
    assert_eq!(
        contested
            .iter()
            .map(|r| (r.node.as_str(), r.bytes_sent))
            .collect::<Vec<_>>(),
        to_it
            .iter()
            .map(|r| (r.node.as_str(), r.bytes_sent))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
}

/// The `contested` grouping's rows (sorted) and the scorecard's contested count and bytes
/// (jurisdiction MA, where the suite's nodes are) over `[since, until)`.
async fn contested_answer(store: &dyn Store, since: i64, until: i64) -> (String, String) {
    use crate::query::scorecard;
    let (mut rows, left_out) = store
        .egress(EgressQuery {
            since_unix_ms: since,
            until_unix_ms: until,
            by: "contested".into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    rows.sort_by_key(|r| format!("{r:?}"));
    let inputs = scorecard::read_inputs(store, since, until).await.unwrap();
    let policy = scorecard::policy_for("MA").unwrap();
    let card = scorecard::build(&policy, &inputs, since, until, until);
    (
        format!("left out {left_out}: {rows:?}"),
        card["data"]["contested"].to_string(),
    )
}

/// Contested-level rows' totals (`level` "hour" or "day") against the contested minute rows'
/// totals before `end`.
async fn assert_contested_totals_equal(db: &dyn Backend, level: &str, end: i64) {
    for col in ["bytes_sent", "bytes_received", "connections"] {
        let minutes = db
            .count(&format!(
                "SELECT CAST(COALESCE(SUM({col}), 0) AS BIGINT) FROM flows_minute
                 WHERE contested <> 0 AND minute_ms < {end}"
            ))
            .await;
        let rolled = db
            .count(&format!(
                "SELECT CAST(COALESCE(SUM({col}), 0) AS BIGINT) FROM contested_{level}"
            ))
            .await;
        assert_eq!(
            rolled, minutes,
            "{col}: contested {level} rows against contested minute rows"
        );
    }
}

pub(crate) async fn contested_rows_serve_the_scorecard_through_rollups_late_rows_and_retention(
    db: &dyn Backend,
) {
    use super::Retention;
    use super::rollup::DAY_MS;
    let store = db.store();
    write_days(store).await;
    let d = DAY_MS;
    let ranges = DAY_RANGES;
    let mut before = Vec::new();
    for (since, until) in ranges {
        before.push(contested_answer(store, since, until).await);
    }
    assert!(
        before[0].1.contains("\"destinations\":1") && before[0].0.contains("203.0.113.9"),
        "{:?}",
        before[0]
    );
    // Hours to 5 h into day 3 and days 0..3 plus day 3 so far: the contested level holds the
    // contested minutes' sums, and every answer is the one the minutes gave.
    let rolled = 3 * d + 5 * HOUR_MS;
    let stats = store.roll_up(rolled + 59_000).await.unwrap();
    assert_eq!(stats.days_up_to_unix_ms, rolled, "{stats:?}");
    assert!(stats.contested_rows > 0, "{stats:?}");
    assert!(db.count("SELECT COUNT(*) FROM contested_day").await > 0);
    assert_contested_totals_equal(db, "hour", rolled).await;
    assert_contested_totals_equal(db, "day", rolled).await;
    // Only contested rows: the hour rows' contested sums, not all of them.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM contested_hour WHERE contested = 0")
            .await,
        0
    );
    for ((since, until), want) in ranges.into_iter().zip(&before) {
        assert_eq!(
            &contested_answer(store, since, until).await,
            want,
            "[{since}, {until}) after the rollup"
        );
    }

    // A late report: a contested flow merging into a rolled-up minute row of day 0 (same
    // key: node a, pid 10, the minute of report k = 2), and a new contested destination in
    // day 1. Both reach the hour and day rows in the report's own transaction.
    let merged_at = (420 + 2 * (3 * 3600 + 420)) * 1000 - 2000;
    let late_at = d + 7 * HOUR_MS + 27 * 60_000 + 500;
    let mut late = report("a", 1, 6);
    late.observed_unix_ms = late_at;
    late.received_unix_ms = 4 * d;
    let mut new_dest = flow(20, "curl", "203.0.113.50", "NL", 1136, 9_000, late_at);
    new_dest.verdict.contested = true;
    late.telemetry.flows = vec![
        flow(10, "vllm", "203.0.113.9", "DE", 3320, 4_000, merged_at),
        new_dest,
    ];
    assert_eq!(ingest(store, late).await, IngestOutcome::Stored);
    assert_contested_totals_equal(db, "hour", rolled).await;
    assert_contested_totals_equal(db, "day", rolled).await;
    let after_late = contested_answer(store, 0, 4 * d).await;
    assert!(
        after_late.1.contains("\"destinations\":2") && after_late.0.contains("203.0.113.50"),
        "the late contested destination is counted: {after_late:?}"
    );
    let (rows, _) = store
        .egress(EgressQuery {
            since_unix_ms: 0,
            until_unix_ms: 4 * d,
            by: "contested".into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let sent: u64 = rows.iter().map(|r| r.bytes_sent).sum();
    let minutes = db
        .count("SELECT CAST(SUM(bytes_sent) AS BIGINT) FROM flows_minute WHERE contested <> 0")
        .await;
    assert_eq!(i64::try_from(sent).unwrap(), minutes, "{rows:?}");
    let mut after = Vec::new();
    for (since, until) in ranges {
        after.push(contested_answer(store, since, until).await);
    }

    // Minutes kept two days, hours one: the contested hour rows before day 1 go with the
    // other hour rows, and the answers over whole days are unchanged; then day rows before
    // day 1 go too (the whole days from day 1 on still answer the same).
    let steps: [(i64, &str, &str, &[usize]); 2] = [
        (0, "contested_hour", "hour_ms", &[0, 2, 3]),
        (d, "contested_day", "day_ms", &[2]),
    ];
    for (aggregates, table, column, unchanged) in steps {
        store
            .prune(Retention {
                raw_before_unix_ms: 0,
                aggregates_before_unix_ms: aggregates,
                minutes_before_unix_ms: 2 * d,
                hours_before_unix_ms: d,
            })
            .await
            .unwrap();
        let gone = format!("SELECT COUNT(*) FROM {table} WHERE {column} < {d}");
        assert_eq!(db.count(&gone).await, 0, "{table}");
        assert!(db.count(&format!("SELECT COUNT(*) FROM {table}")).await > 0);
        for &i in unchanged {
            let (since, until) = ranges[i];
            assert_eq!(
                contested_answer(store, since, until).await,
                after[i],
                "[{since}, {until}) after {table} was pruned"
            );
        }
    }
}
