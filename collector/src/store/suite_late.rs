//! The store suite's late flow rows (issue 14), run on every backend by
//! [`super::suite::store_suite!`]: flows of minutes already rolled up into hour and day rows,
//! derived many in one batch, reach their hour, day, fleet and rest-of-day rows exactly once,
//! also when a minute row changes its verdict (and so its hour row).

use super::rollup::{DAY_MS, HOUR_MS};
use super::suite::{Backend, report};
use super::suite_rollup::{
    assert_day_totals_equal, assert_fleet_is_the_sum, assert_totals_equal, flow, write_days,
};
use super::{Derivation, FlowRecord, IncomingReport, IngestOutcome, Store};

/// Append `reports`, then derive them all in one batch.
async fn derive_together(store: &dyn Store, reports: &[IncomingReport]) {
    for r in reports {
        assert_eq!(
            store.ingest(r.clone()).await.unwrap(),
            IngestOutcome::Stored
        );
    }
    let batch: Vec<Derivation> = store
        .underived(100_000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|u| {
            reports
                .iter()
                .find(|r| (r.node.as_str(), r.epoch, r.seq) == (u.node.as_str(), u.epoch, u.seq))
                .map(|r| Derivation {
                    queue_id: u.queue_id,
                    report: r.clone(),
                })
        })
        .collect();
    assert_eq!(batch.len(), reports.len(), "every report queued");
    assert_eq!(
        store.derive(batch).await.unwrap(),
        reports.len() as u64,
        "every report derived in one batch"
    );
}

/// A report of `node` observed at `at` (received long after) carrying `flows`.
fn late(node: &str, seq: u64, at: i64, flows: Vec<FlowRecord>) -> IncomingReport {
    let mut r = report(node, 1, seq);
    r.observed_unix_ms = at;
    r.received_unix_ms = 4 * DAY_MS;
    r.telemetry.flows = flows;
    r
}

/// [`flow`] of pid 10 (`vllm`) to 192.0.2.1 (US), with a minimum RTT of `rtt_us` and a
/// verdict whose answers name `answer`.
fn vllm_us(sent: u64, end_ms: i64, rtt_us: u32, answer: &str) -> FlowRecord {
    let mut f = flow(10, "vllm", "192.0.2.1", "US", 13335, sent, end_ms);
    f.flow.min_rtt_us = rtt_us;
    f.verdict.answers_json = format!(
        r#"[{{"source":"test-db","country":"{answer}","kind":"registry","impossible":false,"distance_km":0}}]"#
    ).into();
    f
}

/// Hour rows of the rolled-up hours whose additive sums differ from those of their minute
/// rows grouped by the hour row's key (node, hour, process, destination country and ASN,
/// verdict), plus hour rows with sums left that no minute row accounts for (a row whose
/// minutes all moved to another verdict is kept, with zero sums).
async fn hour_sum_mismatches(db: &dyn Backend) -> i64 {
    let grouped = "SELECT m.node AS n, m.minute_ms - (m.minute_ms % 3600000) AS h, m.pid AS p,
                m.process AS pr, m.direction AS d, m.country AS c, m.asn AS a, m.answers AS an,
                m.contested AS co, m.operator_country AS oc, m.physics AS ph,
                SUM(m.bytes_sent) AS bs, SUM(m.bytes_received) AS br, SUM(m.connections) AS cn,
                SUM(m.conntrack_bytes) AS ct, SUM(m.unmeasured_flows) AS uf
         FROM flows_minute m
         WHERE m.minute_ms < (SELECT up_to_ms FROM rollup_state WHERE name = 'hourly')
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11";
    let differ = db
        .count(&format!(
            "SELECT COUNT(*) FROM ({grouped}) g
             LEFT JOIN flows_hour r ON r.node = g.n AND r.hour_ms = g.h AND r.pid = g.p
                  AND r.process = g.pr AND r.direction = g.d AND r.country = g.c AND r.asn = g.a
                  AND r.answers = g.an AND r.contested = g.co AND r.operator_country = g.oc
                  AND r.physics = g.ph
             WHERE r.node IS NULL OR r.bytes_sent <> g.bs OR r.bytes_received <> g.br
                OR r.connections <> g.cn OR r.conntrack_bytes <> g.ct OR r.unmeasured_flows <> g.uf"
        ))
        .await;
    let unaccounted = db
        .count(&format!(
            "SELECT COUNT(*) FROM flows_hour r
             LEFT JOIN ({grouped}) g ON r.node = g.n AND r.hour_ms = g.h AND r.pid = g.p
                  AND r.process = g.pr AND r.direction = g.d AND r.country = g.c AND r.asn = g.a
                  AND r.answers = g.an AND r.contested = g.co AND r.operator_country = g.oc
                  AND r.physics = g.ph
             WHERE g.n IS NULL AND (r.bytes_sent <> 0 OR r.bytes_received <> 0
                OR r.connections <> 0 OR r.conntrack_bytes <> 0 OR r.unmeasured_flows <> 0)"
        ))
        .await;
    differ + unaccounted
}

/// Every check of the rolled-up rows against the minute rows, and the day rows' bytes sent
/// against what the committed reports sent.
async fn assert_rolled_rows_hold(db: &dyn Backend, rolled: i64, sent: i64, when: &str) {
    assert_totals_equal(db, rolled).await;
    assert_day_totals_equal(db, rolled).await;
    assert_eq!(
        hour_sum_mismatches(db).await,
        0,
        "hour rows against their minute rows {when}"
    );
    assert_fleet_is_the_sum(db, when).await;
    assert_eq!(
        db.count("SELECT CAST(COALESCE(SUM(bytes_sent), 0) AS BIGINT) FROM flows_day")
            .await,
        sent,
        "day rows against the bytes the committed reports sent {when}"
    );
    assert_eq!(
        db.count(&format!(
            "SELECT COUNT(*) FROM flows_hour WHERE hour_ms >= {rolled}"
        ))
        .await,
        0,
        "no hour row for minutes not rolled up yet {when}"
    );
}

pub(crate) async fn late_rows_derived_in_one_batch_reach_their_hour_day_and_fleet_rows_once(
    db: &dyn Backend,
) {
    let store = db.store();
    let d = DAY_MS;
    write_days(store).await;
    let rolled = 3 * d + 5 * HOUR_MS;
    store.roll_up(rolled + 59_000).await.unwrap();
    let mut sent = db
        .count(&format!(
            "SELECT CAST(SUM(bytes_sent) AS BIGINT) FROM flows_minute WHERE minute_ms < {rolled}"
        ))
        .await;
    assert!(sent > 0);
    assert_rolled_rows_hold(db, rolled, sent, "after the rollups").await;
    let late_rows = super::late_rows_written();

    // Node a's report of 07:17 on day 1 (write_days, 11,000 bytes to 192.0.2.1 through pid 10,
    // RTT 900 us) was rolled up; its minute now gets:
    let at = |day: i64, h: i64, m: i64, ms: i64| day * d + h * HOUR_MS + m * 60_000 + ms;
    let batch = [
        // a flow with a tighter RTT whose verdict names DE: the minute row moves from the
        // hour row of the US answer to a new one;
        late(
            "a",
            5,
            at(1, 7, 17, 30_000),
            vec![vllm_us(5_000, at(1, 7, 17, 30_000), 100, "DE")],
        ),
        // in the same batch, a looser flow of that key (merged in memory first) and a new
        // destination in that minute;
        late(
            "a",
            6,
            at(1, 7, 17, 40_000),
            vec![
                vllm_us(3_000, at(1, 7, 17, 40_000), 900, "US"),
                flow(
                    20,
                    "curl",
                    "192.0.2.77",
                    "JP",
                    2497,
                    7_000,
                    at(1, 7, 17, 40_000),
                ),
            ],
        ),
        // a new minute row of the hour row the first one left (that row loses and gains);
        late(
            "a",
            7,
            at(1, 7, 40, 0),
            vec![vllm_us(4_000, at(1, 7, 40, 0), 900, "US")],
        ),
        // another node's late row in another hour, and a late row of another day;
        late(
            "b",
            9,
            at(1, 8, 7, 100),
            vec![vllm_us(2_000, at(1, 8, 7, 100), 950, "US")],
        ),
        late(
            "a",
            10,
            at(2, 3, 0, 0),
            vec![flow(
                20,
                "curl",
                "198.51.100.7",
                "FR",
                3215,
                1_500,
                at(2, 3, 0, 0),
            )],
        ),
        // and a flow of a minute not rolled up yet: no hour row for it.
        late(
            "b",
            11,
            rolled + 10 * 60_000,
            vec![vllm_us(900, rolled + 10 * 60_000, 900, "US")],
        ),
    ];
    derive_together(store, &batch).await;
    sent += 5_000 + 3_000 + 7_000 + 4_000 + 2_000 + 1_500;
    assert_rolled_rows_hold(db, rolled, sent, "after a batch of late rows").await;
    assert!(
        super::late_rows_written() >= late_rows + 5,
        "the late rows are counted"
    );
    let moved = |answer: &str| {
        format!(
            "SELECT CAST(COALESCE(SUM(bytes_sent), 0) AS BIGINT) FROM flows_hour
             WHERE node = 'a' AND hour_ms = {} AND pid = 10 AND country = 'US' AND answers LIKE '%\"{answer}\"%'",
            at(1, 7, 0, 0)
        )
    };
    assert_eq!(
        db.count(&moved("DE")).await,
        11_000 + 5_000 + 3_000,
        "the minute row's sums moved to the hour row of its new verdict"
    );
    assert_eq!(
        db.count(&moved("US")).await,
        4_000,
        "the hour row of its old verdict kept the other minute's"
    );

    // A second batch moves that minute row again (tighter still, FR): the DE hour row is
    // only left (its sums go to zero), the FR one is new.
    derive_together(
        store,
        &[late(
            "a",
            12,
            at(1, 7, 17, 50_000),
            vec![vllm_us(600, at(1, 7, 17, 50_000), 50, "FR")],
        )],
    )
    .await;
    sent += 600;
    assert_rolled_rows_hold(db, rolled, sent, "after a verdict moved again").await;
    assert_eq!(db.count(&moved("DE")).await, 0);
    assert_eq!(db.count(&moved("FR")).await, 11_000 + 5_000 + 3_000 + 600);
}

/// Rows of the contested level (`table` `contested_hour` or `contested_day`, its period
/// column `level` of `period_ms`, rolled up to `rollup_state` `name`) whose additive sums
/// differ from those of the contested minute rows grouped by its key, plus rows with sums
/// left that no contested minute row accounts for.
async fn contested_sum_mismatches(
    db: &dyn Backend,
    table: &str,
    level: &str,
    period_ms: i64,
    name: &str,
) -> i64 {
    let grouped = format!(
        "SELECT m.node AS n, m.minute_ms - (m.minute_ms % {period_ms}) AS h, m.pid AS p,
                m.process AS pr, m.direction AS d, m.country AS c, m.asn AS a, m.answers AS an,
                m.contested AS co, m.operator_country AS oc, m.physics AS ph,
                m.remote_address AS ra, m.remote_port AS rp,
                SUM(m.bytes_sent) AS bs, SUM(m.bytes_received) AS br, SUM(m.connections) AS cn,
                SUM(m.conntrack_bytes) AS ct, SUM(m.unmeasured_flows) AS uf
         FROM flows_minute m
         WHERE m.contested <> 0
           AND m.minute_ms < (SELECT up_to_ms FROM rollup_state WHERE name = '{name}')
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13"
    );
    let on = format!(
        "r.node = g.n AND r.{level} = g.h AND r.pid = g.p AND r.process = g.pr
         AND r.direction = g.d AND r.country = g.c AND r.asn = g.a AND r.answers = g.an
         AND r.contested = g.co AND r.operator_country = g.oc AND r.physics = g.ph
         AND r.remote_address = g.ra AND r.remote_port = g.rp"
    );
    let differ = db
        .count(&format!(
            "SELECT COUNT(*) FROM ({grouped}) g LEFT JOIN {table} r ON {on}
             WHERE r.node IS NULL OR r.bytes_sent <> g.bs OR r.bytes_received <> g.br
                OR r.connections <> g.cn OR r.conntrack_bytes <> g.ct OR r.unmeasured_flows <> g.uf"
        ))
        .await;
    let unaccounted = db
        .count(&format!(
            "SELECT COUNT(*) FROM {table} r LEFT JOIN ({grouped}) g ON {on}
             WHERE g.n IS NULL AND (r.bytes_sent <> 0 OR r.bytes_received <> 0
                OR r.connections <> 0 OR r.conntrack_bytes <> 0 OR r.unmeasured_flows <> 0)"
        ))
        .await;
    differ + unaccounted
}

/// The contested level's hour and day rows against the contested minute rows, row by row.
async fn assert_contested_rows_hold(db: &dyn Backend, when: &str) {
    assert_eq!(
        contested_sum_mismatches(db, "contested_hour", "hour_ms", HOUR_MS, "hourly").await,
        0,
        "contested hour rows against their minute rows {when}"
    );
    assert_eq!(
        contested_sum_mismatches(db, "contested_day", "day_ms", DAY_MS, "daily").await,
        0,
        "contested day rows against their minute rows {when}"
    );
}

pub(crate) async fn late_rows_derived_in_one_batch_enter_leave_and_move_within_the_contested_level(
    db: &dyn Backend,
) {
    let store = db.store();
    let d = DAY_MS;
    write_days(store).await;
    let rolled = 3 * d + 5 * HOUR_MS;
    store.roll_up(rolled + 59_000).await.unwrap();
    assert!(db.count("SELECT COUNT(*) FROM contested_day").await > 0);
    assert_contested_rows_hold(db, "after the rollups").await;
    let mut sent = db
        .count(&format!(
            "SELECT CAST(SUM(bytes_sent) AS BIGINT) FROM flows_minute WHERE minute_ms < {rolled}"
        ))
        .await;

    let at = |day: i64, h: i64, m: i64, ms: i64| day * d + h * HOUR_MS + m * 60_000 + ms;
    let contested = |mut f: FlowRecord| {
        f.verdict.contested = true;
        f
    };
    // write_days' contested destination (203.0.113.9, DE, pid 10), with a minimum RTT of
    // `rtt_us` and answers naming `answer`.
    let de = |node_sent: u64, end_ms: i64, rtt_us: u32, answer: &str, is_contested: bool| {
        let mut f = vllm_us(node_sent, end_ms, rtt_us, answer);
        f.flow.remote_address = "203.0.113.9".into();
        f.country = "DE".into();
        f.asn = 3320;
        f.org = "AS3320".into();
        f.verdict.contested = is_contested;
        f
    };
    let batch = [
        // Node a's rolled-up minute row of 07:17 on day 1 to 192.0.2.1 (not contested) merges
        // with a contested flow (looser RTT: its verdict stays): the row enters the level.
        late(
            "a",
            30,
            at(1, 7, 17, 20_000),
            vec![contested(vllm_us(2_500, at(1, 7, 17, 20_000), 5_000, "US"))],
        ),
        // Node b's contested row of 07:16 on day 1 gets a tighter flow naming NL, and a
        // looser one in the same batch: it leaves the contested row of its DE answers (left
        // only) and joins a new one of its NL answers.
        late(
            "b",
            31,
            at(1, 7, 16, 30_000),
            vec![de(1_200, at(1, 7, 16, 30_000), 40, "NL", true)],
        ),
        late(
            "b",
            32,
            at(1, 7, 16, 50_000),
            vec![de(800, at(1, 7, 16, 50_000), 5_000, "DE", true)],
        ),
        // Node a's contested row of 01:58 on day 2 gets a tighter flow that is not contested
        // itself: the row stays contested (a contested flag once set stays) and moves to the
        // contested row of its new answers.
        late(
            "a",
            33,
            at(2, 1, 58, 10_000),
            vec![de(700, at(2, 1, 58, 10_000), 30, "FR", false)],
        ),
        // A new contested destination in day 3's rolled-up hours, and one in a minute not
        // rolled up yet (no contested hour or day row for it).
        late(
            "b",
            34,
            at(3, 4, 30, 0),
            vec![contested(flow(
                20,
                "curl",
                "203.0.113.77",
                "NL",
                1136,
                900,
                at(3, 4, 30, 0),
            ))],
        ),
        late(
            "b",
            35,
            rolled + 10 * 60_000,
            vec![contested(flow(
                20,
                "curl",
                "203.0.113.78",
                "NL",
                1136,
                600,
                rolled + 10 * 60_000,
            ))],
        ),
    ];
    derive_together(store, &batch).await;
    sent += 2_500 + 1_200 + 800 + 700 + 900;
    assert_contested_rows_hold(db, "after a batch of late rows").await;
    assert_rolled_rows_hold(db, rolled, sent, "after a batch of late contested rows").await;
    let level_sent = |table: &str, level: &str, since: i64, filter: &str| {
        format!(
            "SELECT CAST(COALESCE(SUM(bytes_sent), 0) AS BIGINT) FROM {table}
             WHERE {level} = {since} AND {filter}"
        )
    };
    for (table, level, since) in [
        ("contested_hour", "hour_ms", at(1, 7, 0, 0)),
        ("contested_day", "day_ms", d),
    ] {
        assert_eq!(
            db.count(&level_sent(
                table,
                level,
                since,
                "node = 'a' AND remote_address = '192.0.2.1'"
            ))
            .await,
            11_000 + 2_500,
            "{table}: a row that became contested carries all its sums"
        );
        let b_de = |answer: &str| {
            level_sent(
                table,
                level,
                since,
                &format!(
                    "node = 'b' AND remote_address = '203.0.113.9' AND answers LIKE '%\"{answer}\"%'"
                ),
            )
        };
        assert_eq!(
            db.count(&b_de("NL")).await,
            11_000 + 2 * 37 + 1 + 1_200 + 800,
            "{table}: the row moved to the contested row of its new answers"
        );
    }
    assert_eq!(
        db.count(&level_sent(
            "contested_hour",
            "hour_ms",
            rolled,
            "remote_address = '203.0.113.78'"
        ))
        .await,
        0,
        "no contested row for a minute not rolled up"
    );
    let (rows, _) = store
        .egress(super::EgressQuery {
            since_unix_ms: 0,
            until_unix_ms: 4 * d,
            by: "contested".into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let by_level: u64 = rows.iter().map(|r| r.bytes_sent).sum();
    let minutes = db
        .count("SELECT CAST(SUM(bytes_sent) AS BIGINT) FROM flows_minute WHERE contested <> 0")
        .await;
    assert_eq!(i64::try_from(by_level).unwrap(), minutes, "{rows:?}");
}
