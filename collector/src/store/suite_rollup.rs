//! The store suite's hourly rollup behaviours (issue 14, queries at volume), run on every
//! backend by [`super::suite::store_suite!`]: hour rows hold exactly the minute rows' totals,
//! and every question asked before a rollup gets the same answer after it, for ranges that
//! span rolled-up hours and fresh minutes, also when a late report lands in a rolled-up hour.

use sov_proto::pb;

use super::rollup::HOUR_MS;
use super::suite::{Backend, ingest, report, telemetry};
use super::{EgressQuery, FlowRecord, IngestOutcome, Store};

/// An outbound flow of `pid` to `remote`, placed in `country` / `asn`, ending at `end_ms`.
fn flow(
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
        org: format!("AS{asn}"),
        geo_source: "test-db".into(),
        verdict: crate::store::VerdictColumns {
            answers_json: format!(
                r#"[{{"source":"test-db","country":"{country}","kind":"registry","impossible":false,"distance_km":0}}]"#
            ),
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
async fn assert_totals_equal(db: &dyn Backend, end: i64) {
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
async fn write_days(store: &dyn Store) {
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
async fn assert_day_totals_equal(db: &dyn Backend, end: i64) {
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

pub(crate) async fn day_rows_total_the_minutes_and_answers_survive_the_minutes(db: &dyn Backend) {
    use super::Retention;
    use super::rollup::DAY_MS;
    let store = db.store();
    write_days(store).await;
    let d = DAY_MS;
    // All of it; mid-hour on day 1 to mid-hour on day 3 (minutes, hours, a day, hours,
    // minutes); whole days; inside one day.
    let ranges = [
        (0, 4 * d),
        (
            d + 5 * HOUR_MS + 17 * 60_000 + 5,
            3 * d + 2 * HOUR_MS + 60_000,
        ),
        (d, 3 * d),
        (2 * d + 60_000, 2 * d + 50 * 60_000),
    ];
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
