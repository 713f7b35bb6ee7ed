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
    );
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
