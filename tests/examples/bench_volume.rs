//! Queries at volume (issue 14): fill a store quickly with a synthetic fleet, straight into
//! its tables (bulk load, not through gRPC), then time the regulators' questions through the
//! collector's own query layer (`QueryService`, what `sovctl` reaches over gRPC).
//!
//! ```sh
//! cargo run --release -p sov-e2e --example bench_volume -- --json
//! cargo run --release -p sov-e2e --example bench_volume -- --nodes 20 --days 7 --json
//! ```
//!
//! The fleet: `--nodes` nodes over the `--days` whole days before today and today so far.
//! Each node sends a report every `--interval-secs` (10); the flows of a minute are `--flows`
//! (50) per node after the collector merges a minute's reports by (node, minute, process,
//! destination), to a working set drawn each day from `--destinations` (3,000) addresses in 30
//! countries and 200 ASNs, 1 % of them contested. A quarter of the nodes have 4 GPUs, one
//! process each, whose GPU seconds are stored per report as the deriver stores them
//! (`gpu_usage`). Every node holds 10–40 weight files from a pool of 400 models; 5 % of nodes
//! have missing reports; about two breaches per node go through the store's own
//! `observe_breach` (the hash-chained log).
//!
//! The store is built in the shape retention leaves it (issue 14: minutes kept a shorter time
//! than hour rows, day rows for the rest): flow minutes and raw GPU usage only for the last
//! `--minute-hours` (2) hours, hour rows for the `--hour-days` (31) days before today and
//! today (only the days the questions read hour rows of — today, yesterday, 7, 8, 30 and 31
//! days ago — unless `--all-hours`; `--read-hours-only`: today, 7 and 30 days ago only, the
//! days the questions read at the build's instant, which a store kept with `--keep` is asked
//! again at), day rows for every whole day before the minutes (and the
//! contested level's hour and day rows, `contested_hour` and `contested_day`, for the same
//! periods: one row per contested destination of a node's working set), each the sums the rollups would
//! write (destinations sharing a key merged); `rollup_state` is set where those rollups would
//! stand. Report keys are loaded for the last `--key-hours` (24) hours: each node's current
//! epoch started then; the earlier epoch's keys are counted in `node_epochs` but not loaded
//! (bodies are never loaded: see the bytes note in the output); `--keys-missing-only` loads
//! them only for the nodes with missing reports (the only keys a question reads). Rows go in by bulk load in
//! batches of 50,000 per table (SQLite: prepared inserts, `synchronous = OFF`; PostgreSQL:
//! `COPY`), with progress every 15 s.
//!
//! Then, unless `--no-rollup`, the store's own rollup (`Store::roll_up`) runs up to
//! `--rollup-after-minutes` (2) before now, as the collector's loop does by default: the
//! loaded minutes go into hour rows, and whole hours into day rows.
//!
//! Each question is asked `--reps` (5) times after one warm-up (`--warmup 0`: none): `scorecard --since 30d`,
//! `egress --since 7d --by country`, `--by process`, `models`, `breaches`,
//! `report --since 30d`. `--stores sqlite,postgres` picks the stores; PostgreSQL is the one
//! `SOV_TEST_POSTGRES_URL` names (default `postgres://postgres@127.0.0.1:5432/test`), in a
//! fresh schema dropped at the end (skipped, loudly, when it cannot be reached).
//!
//! Every range ends at the build's instant (`now`, a minute boundary: the last loaded minute
//! rows end there), not at the clock when the questions run. `--keep DIR` builds into `DIR`
//! and keeps the stores (SQLite under `DIR/sqlite`, the PostgreSQL schema not dropped) with
//! the shape and `now` in `DIR/kept.json`; `--reuse DIR` asks the questions of those stores
//! again without building, over the same ranges, so that two binaries (before and after a
//! change) can be timed on one store; `--drop` drops a kept PostgreSQL schema after the run.
//! `--parts` also times, alone, each store read the scorecard makes (nodes, models, missing
//! ranges, GPU usage, training runs, egress by verdict and contested destinations) and the
//! two egress questions' store reads (`parts` in the JSON line).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use futures::SinkExt;
use serde_json::{Value, json};
use sov_collector::auth::{Identity, Role};
use sov_collector::breach::{Observation, Severity};
use sov_collector::query::{Caller, QueryService, Via};
use sov_collector::store::postgres::PostgresStore;
use sov_collector::store::{SqliteStore, Store};
use sov_proto::pb;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn text_arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

/// A small deterministic generator (xorshift), so two stores get the same fleet.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone)]
struct Shape {
    nodes: u64,
    days: u64,
    interval_secs: u64,
    flows: u64,
    destinations: u64,
    now: i64,
    start: i64,
    /// Flow minutes (and raw GPU usage) are loaded from here on; older hours are loaded as
    /// hour rows (an hour boundary: where the hourly rollup stands after the load).
    minutes_from: i64,
    /// Hour rows are loaded from here on (a day boundary); older days as day rows only.
    hours_from: i64,
    /// Report keys are loaded from here on: each node's current epoch (2) started here.
    keys_from: i64,
    /// Load the hour rows of every day of the hour window (`--all-hours`).
    all_hours: bool,
    /// Load hour rows only for the days the questions read at the build's instant (today,
    /// 7 and 30 days ago), not the day before each (`--read-hours-only`).
    read_hours_only: bool,
}

impl Shape {
    /// Whether the hour rows of the day starting at `day_start` are loaded: every day of
    /// the hour window with `--all-hours`, else only the days whose hours the questions read
    /// (the ends of their ranges: today, yesterday, 7 and 30 days ago and the day before
    /// each); the other days' hour rows cost disk (measured per node-day), not time.
    fn hour_day(&self, day_start: i64) -> bool {
        let today = self.now - self.now.rem_euclid(DAY);
        let ago = (today - day_start) / DAY;
        if self.read_hours_only {
            return self.all_hours || matches!(ago, 0 | 7 | 30);
        }
        self.all_hours || matches!(ago, 0 | 1 | 7 | 8 | 30 | 31)
    }

    /// Where the daily rollup stands after the load: the day of `minutes_from`.
    fn days_up_to(&self) -> i64 {
        self.minutes_from - self.minutes_from.rem_euclid(DAY)
    }
}

/// One destination of the pool.
struct Dest {
    address: String,
    port: i64,
    country: &'static str,
    asn: i64,
    org: String,
    answers: String,
    contested: i64,
    operator_country: &'static str,
    physics: &'static str,
    distance_km: i64,
}

const COUNTRIES: [&str; 30] = [
    "MA", "MA", "MA", "MA", "FR", "US", "US", "DE", "IE", "NL", "GB", "ES", "IT", "SE", "FI", "PL",
    "BE", "CH", "AT", "PT", "CA", "JP", "SG", "IN", "BR", "AU", "ZA", "EG", "TN", "AE",
];
const PROCESSES: [&str; 6] = ["python3", "vllm", "curl", "nginx", "sshd", "node_exporter"];

fn pool(shape: &Shape) -> Vec<Dest> {
    let mut rng = Rng(0x5eed_0001);
    (0..shape.destinations)
        .map(|i| {
            let country = COUNTRIES[rng.below(COUNTRIES.len() as u64) as usize];
            let asn = 64_512 + (rng.below(200) as i64);
            let contested = i64::from(rng.below(100) == 0);
            let answers = if contested == 1 {
                format!(
                    r#"[{{"source":"dbip-country","country":"{country}","kind":"registry","impossible":false,"distance_km":0}},{{"source":"iptoasn","country":"US","kind":"registry","impossible":false,"distance_km":0}}]"#
                )
            } else {
                format!(
                    r#"[{{"source":"dbip-country","country":"{country}","kind":"registry","impossible":false,"distance_km":0}}]"#
                )
            };
            Dest {
                address: format!("198.{}.{}.{}", 18 + (i >> 16) % 2, (i >> 8) & 255, i & 255),
                port: [443, 443, 443, 80, 8443, 5432][rng.below(6) as usize],
                country,
                asn,
                org: format!("AS{asn} Carrier"),
                answers,
                contested,
                operator_country: if rng.below(10) == 0 { "US" } else { country },
                physics: "possible",
                distance_km: rng.below(9000) as i64,
            }
        })
        .collect()
}

fn node_name(i: u64) -> String {
    format!("node-{i:05}")
}

fn node_country(i: u64) -> &'static str {
    if i % 10 == 9 { "FR" } else { "MA" }
}

fn has_gpus(i: u64) -> bool {
    i.is_multiple_of(4)
}

/// Reports a node sent in the range, and how many of its sequence numbers are missing.
fn node_reports(shape: &Shape, i: u64) -> (u64, u64) {
    let reports = (shape.now - shape.start) as u64 / (shape.interval_secs * 1000);
    let missing = if i % 20 == 7 { 12 } else { 0 };
    (reports, missing)
}

/// The rows of one table, as values in the table's column order.
type Row = Vec<V>;

#[derive(Clone)]
enum V {
    I(i64),
    F(f64),
    T(String),
    /// An empty blob.
    B,
}

impl V {
    fn copy_text(&self, out: &mut String) {
        match self {
            V::I(v) => {
                let _ = write!(out, "{v}");
            }
            V::F(v) => {
                let _ = write!(out, "{v}");
            }
            V::B => {}
            V::T(s) => {
                for c in s.chars() {
                    match c {
                        '\\' => out.push_str("\\\\"),
                        '\t' => out.push_str("\\t"),
                        '\n' => out.push_str("\\n"),
                        _ => out.push(c),
                    }
                }
            }
        }
    }
}

impl rusqlite::ToSql for V {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(match self {
            V::I(v) => (*v).into(),
            V::F(v) => (*v).into(),
            V::T(s) => s.as_str().into(),
            V::B => rusqlite::types::ToSqlOutput::Borrowed(rusqlite::types::ValueRef::Blob(&[])),
        })
    }
}

const FLOW_COLUMNS: &str = "node, minute_ms, pid, process, protocol, direction, remote_address, remote_port, country, asn, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, answers, contested, operator_country, physics, distance_km, limit_km, conntrack_bytes, unmeasured_flows";

/// The columns of `flows_hour` and `flows_day` (the period column named by the caller).
fn rolled_columns(period: &str) -> String {
    format!(
        "node, {period}, pid, process, direction, country, asn, answers, contested, operator_country, physics, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us, distance_km, limit_km, conntrack_bytes, unmeasured_flows"
    )
}

/// The columns of `contested_hour` and `contested_day`: those of [`rolled_columns`] and the
/// destination.
fn contested_columns(period: &str) -> String {
    format!("{}, remote_address, remote_port", rolled_columns(period))
}

/// Add the sums of `rows` (rolled rows, one per key in the same order) into `sums`: bytes
/// and connections add up, the least RTT is kept.
fn add_rows(sums: &mut [Row], rows: &[Row]) {
    for (sum, r) in sums.iter_mut().zip(rows) {
        for c in [13, 14, 15] {
            if let (V::I(a), V::I(b)) = (&sum[c], &r[c]) {
                sum[c] = V::I(a + b);
            }
        }
        if let (V::I(a), V::I(b)) = (&sum[16], &r[16]) {
            sum[16] = V::I(*a.min(b));
        }
    }
}

/// Add the hour rows `rows` to the day rows `sums` of the day starting at `day_start` (the
/// first hour's rows, restamped, when there are none yet).
fn add_to_day(sums: &mut Vec<Row>, rows: &[Row], day_start: i64) {
    if sums.is_empty() {
        *sums = rows
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r[1] = V::I(day_start);
                r
            })
            .collect();
    } else {
        add_rows(sums, rows);
    }
}

/// Rows waiting to be loaded, per table, flushed in large batches.
#[derive(Default)]
struct Batches {
    tables: BTreeMap<&'static str, (String, Vec<Row>)>,
    counts: BTreeMap<&'static str, u64>,
}

impl Batches {
    const FLUSH_AT: usize = 50_000;

    async fn push(
        &mut self,
        loader: &mut Loader,
        table: &'static str,
        columns: &str,
        rows: Vec<Row>,
    ) -> anyhow::Result<()> {
        *self.counts.entry(table).or_default() += rows.len() as u64;
        let entry = self
            .tables
            .entry(table)
            .or_insert_with(|| (columns.to_owned(), Vec::new()));
        entry.1.extend(rows);
        if entry.1.len() >= Self::FLUSH_AT {
            let rows = std::mem::take(&mut entry.1);
            loader.load(table, &entry.0, rows).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, loader: &mut Loader) -> anyhow::Result<()> {
        for (table, (columns, rows)) in &mut self.tables {
            let rows = std::mem::take(rows);
            loader.load(table, columns, rows).await?;
        }
        Ok(())
    }

    fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// What an hour or day row is keyed by besides node and period: process, country, ASN,
/// answers, contested, operator country.
type RolledKey<'a> = (u64, &'a str, i64, &'a str, i64, &'a str);

/// One rolled-up flow row: the sums of the destinations of one key over a period.
fn rolled_row(
    node: &str,
    at: i64,
    dest: &Dest,
    p: u64,
    k: i64,
    minutes: i64,
    rng: &mut Rng,
) -> Row {
    let sent = k * minutes * 2_000 + rng.below((k * minutes * 400_000) as u64) as i64;
    vec![
        V::T(node.to_owned()),
        V::I(at),
        V::I(1000 + p as i64),
        V::T(PROCESSES[p as usize].to_owned()),
        V::T("outbound".to_owned()),
        V::T(dest.country.to_owned()),
        V::I(dest.asn),
        V::T(dest.answers.clone()),
        V::I(dest.contested),
        V::T(dest.operator_country.to_owned()),
        V::T(dest.physics.to_owned()),
        V::T(dest.org.clone()),
        V::T("dbip-country".to_owned()),
        V::I(sent),
        V::I(sent / 4),
        V::I(k * minutes + rng.below((k * minutes * 5) as u64) as i64),
        V::I(5_000 + rng.below(80_000) as i64),
        V::I(dest.distance_km),
        V::I(20_000),
        V::I(0),
        V::I(0),
    ]
}

/// Every flow row of node `i` on day `day`, at the level the retention shape keeps it:
/// minutes from `minutes_from` on, hour rows from `hours_from` on, a day row for every day
/// before the daily rollup's point (the sums of its hours, as the rollup would write them).
async fn flow_rows(
    shape: &Shape,
    dests: &[Dest],
    i: u64,
    day: i64,
    loader: &mut Loader,
    batches: &mut Batches,
) -> anyhow::Result<()> {
    let node = node_name(i);
    let mut rng = Rng(0x9e37_79b9 ^ (i << 20) ^ (day as u64));
    // The day's working set: `flows` destinations, each owned by one process.
    // Distinct destinations (a minute row's key holds the destination, so each is one row).
    let mut seen = std::collections::BTreeSet::new();
    let mut set: Vec<(usize, u64)> = Vec::new();
    while (set.len() as u64) < shape.flows.min(dests.len() as u64) {
        let d = rng.below(dests.len() as u64) as usize;
        if seen.insert(d) {
            set.push((d, rng.below(PROCESSES.len() as u64)));
        }
    }
    // Hour and day rows are keyed without the address: destinations sharing a key merge.
    let mut keys: BTreeMap<RolledKey, (usize, u64, i64)> = BTreeMap::new();
    for (d, p) in &set {
        let dest = &dests[*d];
        keys.entry((
            *p,
            dest.country,
            dest.asn,
            dest.answers.as_str(),
            dest.contested,
            dest.operator_country,
        ))
        .or_insert((*d, *p, 0))
        .2 += 1;
    }
    let day_start = shape.start + day * DAY;
    let day_rows = day_start + DAY <= shape.days_up_to();
    let mut day_sums: Vec<Row> = Vec::new();
    let mut contested_day: Vec<Row> = Vec::new();
    let mut contested_rng = Rng(0xc0_7e57 ^ (i << 20) ^ (day as u64));
    // Rest-of-day rows (`flows_rest`) where a question's range may start: the days whose
    // hour rows are loaded and that the daily rollup has passed.
    let rest_rows = day_rows && day_start >= shape.hours_from && shape.hour_day(day_start);
    let mut hour_sets: Vec<Vec<Row>> = Vec::new();
    for hour in 0..24 {
        let hour_ms = day_start + hour * HOUR;
        if hour_ms >= shape.now {
            break;
        }
        if hour_ms >= shape.minutes_from {
            let mut rows = Vec::with_capacity(60 * set.len());
            for m in 0..60 {
                let minute = hour_ms + m * MINUTE;
                if minute >= shape.now {
                    continue;
                }
                for (d, p) in &set {
                    let dest = &dests[*d];
                    let sent = 2_000 + rng.below(400_000) as i64;
                    rows.push(vec![
                        V::T(node.clone()),
                        V::I(minute),
                        V::I(1000 + *p as i64),
                        V::T(PROCESSES[*p as usize].to_owned()),
                        V::T("tcp".to_owned()),
                        V::T("outbound".to_owned()),
                        V::T(dest.address.clone()),
                        V::I(dest.port),
                        V::T(dest.country.to_owned()),
                        V::I(dest.asn),
                        V::T(dest.org.clone()),
                        V::T("dbip-country".to_owned()),
                        V::I(sent),
                        V::I(sent / 4),
                        V::I(1 + rng.below(6) as i64),
                        V::I(5_000 + rng.below(80_000) as i64),
                        V::T(dest.answers.clone()),
                        V::I(dest.contested),
                        V::T(dest.operator_country.to_owned()),
                        V::T(dest.physics.to_owned()),
                        V::I(dest.distance_km),
                        V::I(20_000),
                        V::I(0),
                        V::I(0),
                    ]);
                }
            }
            batches
                .push(loader, "flows_minute", FLOW_COLUMNS, rows)
                .await?;
            continue;
        }
        let keep_hours = hour_ms >= shape.hours_from && shape.hour_day(day_start);
        if !keep_hours && !day_rows {
            continue;
        }
        let rows: Vec<Row> = keys
            .values()
            .map(|(d, p, k)| rolled_row(&node, hour_ms, &dests[*d], *p, *k, 60, &mut rng))
            .collect();
        if day_rows {
            add_to_day(&mut day_sums, &rows, day_start);
        }
        // The contested level: one row per contested destination of the working set (its
        // key holds the address), from an RNG of its own so that the other rows are the
        // ones a build without this level loads.
        let contested: Vec<Row> = set
            .iter()
            .filter(|(d, _)| dests[*d].contested != 0)
            .map(|(d, p)| {
                let dest = &dests[*d];
                let mut r = rolled_row(&node, hour_ms, dest, *p, 1, 60, &mut contested_rng);
                r.push(V::T(dest.address.clone()));
                r.push(V::I(dest.port));
                r
            })
            .collect();
        if day_rows {
            add_to_day(&mut contested_day, &contested, day_start);
        }
        if keep_hours {
            batches
                .push(
                    loader,
                    "contested_hour",
                    &contested_columns("hour_ms"),
                    contested,
                )
                .await?;
        }
        if rest_rows {
            hour_sets.push(rows.clone());
        }
        if keep_hours {
            batches
                .push(loader, "flows_hour", &rolled_columns("hour_ms"), rows)
                .await?;
        }
    }
    if rest_rows {
        // Suffix sums: the rows of start h hold hours h..24 (h >= 1; h = 0 is the day row).
        let mut acc: Vec<Row> = Vec::new();
        let mut rest = Vec::new();
        for (h, rows) in hour_sets.iter().enumerate().rev() {
            if acc.is_empty() {
                acc = rows.clone();
            } else {
                add_rows(&mut acc, rows);
            }
            if h >= 1 {
                rest.extend(acc.iter().map(|r| {
                    let mut r = r.clone();
                    r[1] = V::I(day_start + h as i64 * HOUR);
                    r
                }));
            }
        }
        batches
            .push(loader, "flows_rest", &rolled_columns("from_ms"), rest)
            .await?;
    }
    if day_rows {
        batches
            .push(loader, "flows_day", &rolled_columns("day_ms"), day_sums)
            .await?;
        batches
            .push(
                loader,
                "contested_day",
                &contested_columns("day_ms"),
                contested_day,
            )
            .await?;
    }
    Ok(())
}

const GPU_COLUMNS: &str = "node, observed_ms, gpu_uuid, pid, process_name, exe, container_id, gpu_seconds, used_memory_bytes";

/// GPU usage of node `i` on day `day` at the level the retention shape keeps it: raw rows
/// (one per report and GPU) from `minutes_from` on, hour rows from `hours_from` on, day rows
/// before the daily rollup's point.
async fn gpu_rows(
    shape: &Shape,
    i: u64,
    day: i64,
    loader: &mut Loader,
    batches: &mut Batches,
) -> anyhow::Result<()> {
    let node = node_name(i);
    let step = (shape.interval_secs * 1000) as i64;
    let per_report = shape.interval_secs as f64 * 0.8;
    let mut rows = Vec::new();
    let mut hours = Vec::new();
    let day_start = shape.start + day * DAY;
    let end = (day_start + DAY).min(shape.now);
    let mut t = day_start.max(shape.minutes_from);
    while t < end {
        for g in 0..4 {
            rows.push(vec![
                V::T(node.clone()),
                V::I(t),
                V::T(format!("GPU-{i:05}-{g}")),
                V::I(2000 + g),
                V::T("vllm".to_owned()),
                V::T("/usr/bin/python3".to_owned()),
                V::T(String::new()),
                V::F(per_report),
                V::I(40 << 30),
            ]);
        }
        t += step;
    }
    let hour_seconds = per_report * (HOUR / step) as f64;
    let mut h = day_start.max(shape.hours_from);
    while h < end.min(shape.minutes_from) && shape.hour_day(day_start) {
        for g in 0..4 {
            hours.push(vec![
                V::T(node.clone()),
                V::I(h),
                V::I(2000 + g),
                V::T("vllm".to_owned()),
                V::T(String::new()),
                V::F(hour_seconds),
            ]);
        }
        h += HOUR;
    }
    let cols = "node, hour_ms, pid, process_name, pod_namespace, gpu_seconds";
    batches.push(loader, "gpu_usage", GPU_COLUMNS, rows).await?;
    batches.push(loader, "gpu_usage_hour", cols, hours).await?;
    if day_start + DAY <= shape.days_up_to() {
        let days = (0..4)
            .map(|g| {
                vec![
                    V::T(node.clone()),
                    V::I(day_start),
                    V::I(2000 + g),
                    V::T("vllm".to_owned()),
                    V::T(String::new()),
                    V::F(hour_seconds * 24.0),
                ]
            })
            .collect();
        batches
            .push(
                loader,
                "gpu_usage_day",
                &cols.replace("hour_ms", "day_ms"),
                days,
            )
            .await?;
    }
    Ok(())
}

const WEIGHT_COLUMNS: &str = "node, path, format, size_bytes, mtime_ms, device, inode, sha256, model, revision, repo_path, identity_source, publisher, parameter_count, mount_point, fs_type, network, server_address, users, detail, first_seen_ms, last_seen_ms";

fn weight_rows(shape: &Shape, i: u64) -> Vec<Row> {
    let mut rng = Rng(0x77 ^ (i << 8));
    let orgs = [
        "meta-llama",
        "mistralai",
        "Qwen",
        "deepseek-ai",
        "google",
        "atlas-ma",
    ];
    let n = 10 + rng.below(31);
    (0..n)
        .map(|k| {
            let m = rng.below(400);
            let org = orgs[(m % orgs.len() as u64) as usize];
            vec![
                V::T(node_name(i)),
                V::T(format!("/models/m{m}/shard-{k}.safetensors")),
                V::T("safetensors".to_owned()),
                V::I(1_000_000_000 + (m as i64) * 7_000_000),
                V::I(shape.start),
                V::I(2049),
                V::I((i * 100 + k) as i64),
                V::T(format!("{:064x}", m * 0x1_0000_0001 + 17)),
                V::T(format!("{org}/model-{m}")),
                V::T("main".to_owned()),
                V::T(String::new()),
                V::T("hf-cache".to_owned()),
                V::T(org.to_owned()),
                V::I(7_000_000_000),
                V::T("/models".to_owned()),
                V::T("ext4".to_owned()),
                V::I(0),
                V::T(String::new()),
                V::T(if k == 0 && has_gpus(i) {
                    r#"[{"pid":2000,"process":"vllm","gpus":[],"mapped":true,"open":true}]"#
                        .to_owned()
                } else {
                    "[]".to_owned()
                }),
                V::B,
                V::I(shape.start),
                V::I(shape.now - MINUTE),
            ]
        })
        .collect()
}

/// A bulk loader for one store: insert `rows` into `table` (`columns`).
enum Loader {
    Sqlite(SqliteLoader),
    Pg(PgLoader),
}

impl Loader {
    async fn load(&mut self, table: &str, columns: &str, rows: Vec<Row>) -> anyhow::Result<()> {
        match self {
            Self::Sqlite(l) => l.load(table, columns, rows),
            Self::Pg(l) => l.load(table, columns, rows).await,
        }
    }
    async fn finish(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Sqlite(l) => l.finish(),
            Self::Pg(l) => l.finish().await,
        }
    }
    async fn exec(&mut self, sql: &str) -> anyhow::Result<()> {
        match self {
            Self::Sqlite(l) => l.exec(sql),
            Self::Pg(l) => l.exec(sql).await,
        }
    }
    async fn bytes(&mut self) -> anyhow::Result<u64> {
        match self {
            Self::Sqlite(l) => l.bytes(),
            Self::Pg(l) => l.bytes().await,
        }
    }
    /// Bytes per table, indexes included (empty where the store cannot say).
    async fn table_bytes(&mut self) -> BTreeMap<String, u64> {
        match self {
            Self::Sqlite(l) => l.table_bytes().unwrap_or_default(),
            Self::Pg(l) => l.table_bytes().await.unwrap_or_default(),
        }
    }
}

struct SqliteLoader {
    conn: rusqlite::Connection,
    path: std::path::PathBuf,
    in_tx: u64,
}

impl SqliteLoader {
    fn open(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(sov_collector::store::sqlite::DB_FILE);
        let conn = rusqlite::Connection::open(&path)?;
        conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144; BEGIN")?;
        Ok(Self {
            conn,
            path,
            in_tx: 0,
        })
    }
}

impl SqliteLoader {
    fn load(&mut self, table: &str, columns: &str, rows: Vec<Row>) -> anyhow::Result<()> {
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let marks = vec!["?"; first.len()].join(", ");
        let mut stmt = self
            .conn
            .prepare_cached(&format!("INSERT INTO {table} ({columns}) VALUES ({marks})"))?;
        for r in &rows {
            stmt.execute(rusqlite::params_from_iter(r.iter()))?;
        }
        drop(stmt);
        self.in_tx += rows.len() as u64;
        if self.in_tx > 2_000_000 {
            self.conn.execute_batch("COMMIT; BEGIN")?;
            self.in_tx = 0;
        }
        Ok(())
    }
    fn finish(&mut self) -> anyhow::Result<()> {
        self.conn
            .execute_batch("COMMIT; PRAGMA wal_checkpoint(TRUNCATE); ANALYZE; BEGIN")?;
        Ok(())
    }
    fn exec(&mut self, sql: &str) -> anyhow::Result<()> {
        self.conn.execute_batch(&format!("COMMIT; {sql}; BEGIN"))?;
        Ok(())
    }
    fn bytes(&mut self) -> anyhow::Result<u64> {
        self.conn
            .execute_batch("COMMIT; PRAGMA wal_checkpoint(TRUNCATE); BEGIN")?;
        let wal = std::fs::metadata(self.path.with_extension("db-wal")).map_or(0, |m| m.len());
        Ok(std::fs::metadata(&self.path)?.len() + wal)
    }
}

impl SqliteLoader {
    fn table_bytes(&mut self) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut stmt = self.conn.prepare(
            "SELECT m.tbl_name, SUM(d.pgsize) FROM dbstat d JOIN sqlite_master m ON m.name = d.name
             GROUP BY m.tbl_name",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let (t, b) = r?;
            out.insert(t, u64::try_from(b).unwrap_or(0));
        }
        Ok(out)
    }
}

struct PgLoader {
    client: tokio_postgres::Client,
    schema: String,
}

impl PgLoader {
    async fn load(&mut self, table: &str, columns: &str, rows: Vec<Row>) -> anyhow::Result<()> {
        let mut text = String::with_capacity(rows.len() * 200);
        for r in &rows {
            for (i, v) in r.iter().enumerate() {
                if i > 0 {
                    text.push('\t');
                }
                v.copy_text(&mut text);
            }
            text.push('\n');
        }
        let sink = self
            .client
            .copy_in(&format!("COPY {table} ({columns}) FROM STDIN"))
            .await?;
        futures::pin_mut!(sink);
        sink.send(bytes::Bytes::from(text)).await?;
        sink.finish().await?;
        Ok(())
    }
    async fn finish(&mut self) -> anyhow::Result<()> {
        self.client.batch_execute("VACUUM ANALYZE").await?;
        Ok(())
    }
    async fn exec(&mut self, sql: &str) -> anyhow::Result<()> {
        self.client.batch_execute(sql).await?;
        Ok(())
    }
    async fn bytes(&mut self) -> anyhow::Result<u64> {
        let row = self
            .client
            .query_one(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::BIGINT FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'm')",
                &[&self.schema],
            )
            .await?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }
    async fn table_bytes(&mut self) -> anyhow::Result<BTreeMap<String, u64>> {
        let rows = self
            .client
            .query(
                "SELECT c.relname::TEXT, pg_total_relation_size(c.oid)::BIGINT FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'm')",
                &[&self.schema],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                )
            })
            .collect())
    }
}

/// Load the fleet through `loader`, then breaches through `store`.
async fn build(
    shape: &Shape,
    loader: &mut Loader,
    store: &dyn Store,
) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let dests = pool(shape);
    let mut batches = Batches::default();
    let started = Instant::now();
    let mut shown = Instant::now();
    let step = (shape.interval_secs * 1000) as i64;
    for i in 0..shape.nodes {
        if shown.elapsed().as_secs() >= 15 || i + 1 == shape.nodes {
            shown = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            let rate = batches.total() as f64 / secs.max(0.001);
            let eta = secs / i.max(1) as f64 * (shape.nodes - i) as f64;
            eprintln!(
                "  loading node {i}/{}: {} rows in {secs:.0} s ({rate:.0} rows/s), about {eta:.0} s left",
                shape.nodes,
                batches.total()
            );
        }
        let node = node_name(i);
        let (reports, missing) = node_reports(shape, i);
        // Epoch 1 ran until `keys_from` (its keys are not loaded: see the module doc); the
        // current epoch 2 since, with `missing` holes in the middle.
        let old_reports = ((shape.keys_from - shape.start) / step).max(0) as u64;
        let new_reports = reports.saturating_sub(old_reports);
        let last_seq = new_reports + missing;
        let gpus = if has_gpus(i) { 4 } else { 0 };
        batches
            .push(
                loader,
                "nodes",
                "node, site, country, hostname, agent_version, labels, first_seen_ms, last_seen_ms, last_observed_ms, latest_epoch, cpu_percent, memory_used_bytes, memory_total_bytes, gpu_state, gpu_count, gpu_util_percent, gpu_memory_used_bytes, gpu_memory_total_bytes",
                vec![vec![
                    V::T(node.clone()),
                    V::T(if node_country(i) == "FR" { "paris".into() } else { "rabat".into() }),
                    V::T(node_country(i).to_owned()),
                    V::T(format!("{node}.example")),
                    V::T("0.14.0".to_owned()),
                    V::T(r#"{"pool":"bench"}"#.to_owned()),
                    V::I(shape.start),
                    V::I(shape.now - 5_000),
                    V::I(shape.now - 5_000),
                    V::I(2),
                    V::F(42.0),
                    V::I(64 << 30),
                    V::I(512 << 30),
                    V::T(if gpus > 0 { "ok".into() } else { "none".into() }),
                    V::I(gpus),
                    V::F(if gpus > 0 { 80.0 } else { 0.0 }),
                    V::I(gpus * (40 << 30)),
                    V::I(gpus * (80 << 30)),
                ]],
            )
            .await?;
        batches
            .push(
                loader,
                "node_epochs",
                "node, epoch, reports, last_seq, conflicts, first_seen_ms, last_seen_ms",
                vec![
                    vec![
                        V::T(node.clone()),
                        V::I(1),
                        V::I(old_reports as i64),
                        V::I(old_reports as i64),
                        V::I(0),
                        V::I(shape.start),
                        V::I(shape.keys_from),
                    ],
                    vec![
                        V::T(node.clone()),
                        V::I(2),
                        V::I(new_reports as i64),
                        V::I(last_seq as i64),
                        V::I(0),
                        V::I(shape.keys_from),
                        V::I(shape.now - 5_000),
                    ],
                ],
            )
            .await?;
        let hole = last_seq / 2;
        let mut keys = Vec::new();
        // `--keys-missing-only`: only the nodes with missing reports get their keys (the
        // only keys a question reads: the scorecard's missing ranges).
        let load_keys = missing > 0 || !flag("--keys-missing-only");
        for seq in (1..=last_seq).filter(|_| load_keys) {
            if missing > 0 && seq >= hole && seq < hole + missing {
                continue;
            }
            let t = shape.keys_from
                + (seq as i64 - 1) * step * new_reports as i64 / last_seq.max(1) as i64;
            keys.push(vec![
                V::T(node.clone()),
                V::I(2),
                V::I(seq as i64),
                V::I(t),
                V::I(t + 20),
                V::B,
            ]);
        }
        batches
            .push(
                loader,
                "reports",
                "node, epoch, seq, observed_ms, received_ms, body",
                keys,
            )
            .await?;
        batches
            .push(
                loader,
                "weight_files",
                WEIGHT_COLUMNS,
                weight_rows(shape, i),
            )
            .await?;
        for day in 0..(shape.now - shape.start + DAY - 1) / DAY {
            flow_rows(shape, &dests, i, day, loader, &mut batches).await?;
            if has_gpus(i) {
                gpu_rows(shape, i, day, loader, &mut batches).await?;
            }
        }
    }
    batches.flush(loader).await?;
    let mut counts = batches.counts;
    // The fleet rows were written by the store's triggers as the hour and day rows loaded;
    // the fleet rest-of-day rows are what the daily rollup would have added for those days.
    loader
        .exec(
            &sov_collector::store::rollup::ROLL_FLEET_REST
                .replace("$1", "0")
                .replace("$2", &shape.days_up_to().to_string()),
        )
        .await?;
    // Where the rollups stand: what was loaded as hour and day rows is rolled up.
    loader
        .exec(&format!(
            "UPDATE rollup_state SET up_to_ms = {} WHERE name = 'hourly'",
            shape.minutes_from
        ))
        .await?;
    loader
        .exec(&format!(
            "UPDATE rollup_state SET up_to_ms = {} WHERE name = 'daily'",
            shape.days_up_to()
        ))
        .await?;
    loader.finish().await?;
    // Some breaches, through the store's own hash-chained path.
    let mut rng = Rng(0xb4ea_c4e5);
    for k in 0..shape.nodes * 2 {
        let i = rng.below(shape.nodes);
        let at = shape.start + rng.below((shape.now - shape.start) as u64) as i64;
        let d = &dests[rng.below(dests.len() as u64) as usize];
        store
            .observe_breach(Observation {
                rule: "foreign-egress".into(),
                node: node_name(i),
                subject: format!("{}:{}", d.address, d.port),
                severity: if k % 7 == 0 {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                evidence: json!({"bytes": 1_000_000 + k, "country": d.country}),
                at_unix_ms: at,
            })
            .await?;
        *counts.entry("breach observations").or_default() += 1;
    }
    Ok(counts)
}

fn regulator() -> Caller {
    Caller {
        id: Identity {
            name: "bench-regulator".into(),
            role: Role::Regulator,
        },
        via: Via::Grpc,
    }
}

/// Ask each question `reps` times after one warm-up, every range ending at `now`;
/// `(query, p50_ms, p99_ms, detail)`.
async fn ask_all(
    svc: &QueryService,
    now: i64,
    reps: usize,
    only: &str,
) -> anyhow::Result<Vec<(String, f64, f64, String)>> {
    let caller = regulator();
    let mut out = Vec::new();
    let names = [
        "scorecard --since 30d",
        "egress --since 7d --by country",
        "egress --since 7d --by process",
        "models",
        "breaches",
        "report --since 30d",
    ];
    for name in names {
        if !only.is_empty() && !only.split(',').any(|o| name.starts_with(o.trim())) {
            continue;
        }
        let mut samples = Vec::new();
        let mut detail = String::new();
        let warmup = usize::from(arg("--warmup", 1) > 0);
        for rep in (1 - warmup)..=reps {
            let t = Instant::now();
            detail = match name {
                "scorecard --since 30d" => {
                    let r = svc
                        .scorecard_as(
                            &caller,
                            pb::ScorecardRequest {
                                since_unix_ms: now - 30 * DAY,
                                until_unix_ms: now,
                                jurisdiction: "MA".into(),
                            },
                        )
                        .await?;
                    let v: Value = serde_json::from_str(&r.scorecard_json)?;
                    format!(
                        "bytes_sent {} contested {} truncated {}",
                        v["data"]["bytes_sent"], v["data"]["contested"], v["truncated"]
                    )
                }
                "egress --since 7d --by country" | "egress --since 7d --by process" => {
                    let by = name.rsplit(' ').next().unwrap_or("country");
                    let r = svc
                        .egress_as(
                            &caller,
                            pb::EgressRequest {
                                since_unix_ms: now - 7 * DAY,
                                until_unix_ms: now,
                                by: by.into(),
                                limit: 500,
                            },
                        )
                        .await?;
                    let sent: u64 = r.rows.iter().map(|r| r.bytes_sent).sum();
                    format!("{} rows, {} bytes sent", r.rows.len(), sent)
                }
                "models" => {
                    let mut after = String::new();
                    let mut n = 0;
                    loop {
                        let page = svc
                            .list_models_as(
                                &caller,
                                pb::ListModelsRequest {
                                    query: String::new(),
                                    limit: 500,
                                    after,
                                },
                            )
                            .await?;
                        n += page.models.len();
                        if page.next_after.is_empty() {
                            break;
                        }
                        after = page.next_after;
                    }
                    format!("{n} models")
                }
                "breaches" => {
                    let r = svc
                        .list_breaches_as(
                            &caller,
                            pb::ListBreachesRequest {
                                limit: 500,
                                ..Default::default()
                            },
                        )
                        .await?;
                    format!("{} breaches", r.breaches.len())
                }
                _ => {
                    let r = svc
                        .export_report_as(
                            &caller,
                            pb::ExportReportRequest {
                                since_unix_ms: now - 30 * DAY,
                                until_unix_ms: now,
                                jurisdiction: "MA".into(),
                            },
                        )
                        .await?;
                    format!("{} bytes signed", r.signed_json.len())
                }
            };
            if rep > 0 {
                samples.push(t.elapsed());
            }
        }
        samples.sort();
        let pct = |p: f64| {
            let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
            (samples[i].as_secs_f64() * 1000.0 * 10.0).round() / 10.0
        };
        eprintln!(
            "  {name:<34} p50 {:>9.1} ms  p99 {:>9.1} ms  ({detail})",
            pct(0.5),
            pct(0.99)
        );
        out.push((name.to_owned(), pct(0.5), pct(0.99), detail));
    }
    Ok(out)
}

/// With `--parts`: each store read of the scorecard over 30 days (what
/// `query::scorecard::read_inputs` reads, in its order) and of the two egress questions,
/// timed alone, `reps` times after one warm-up; `(part, p50_ms, rows)`.
async fn time_parts(
    store: &dyn Store,
    now: i64,
    reps: usize,
) -> anyhow::Result<Vec<(String, f64, usize)>> {
    use sov_collector::query::scorecard::{MAX_NODES_WITH_RANGES, MAX_RANGES_PER_NODE, MAX_ROWS};
    use sov_collector::store::EgressQuery;
    let from30 = sov_collector::query::covered_from(now - 30 * DAY, now);
    let from7 = sov_collector::query::covered_from(now - 7 * DAY, now);
    let egress = |since: i64, by: &str| EgressQuery {
        since_unix_ms: since,
        until_unix_ms: now,
        by: by.to_owned(),
        limit: if by == "country" || by == "process" {
            500
        } else {
            MAX_ROWS
        },
        ..Default::default()
    };
    let mut out = Vec::new();
    for part in [
        "nodes",
        "models",
        "missing ranges",
        "gpu usage 30d",
        "training 30d",
        "egress 30d verdict",
        "egress 30d contested",
        "egress 7d country",
        "egress 7d process",
    ] {
        let mut samples = Vec::new();
        let mut rows = 0;
        for rep in 0..=reps {
            let t = Instant::now();
            rows = match part {
                "nodes" => sov_collector::store::all_nodes(store, MAX_ROWS as usize)
                    .await?
                    .0
                    .len(),
                "models" => store.model_holdings(MAX_ROWS).await?.0.len(),
                "missing ranges" => {
                    let (nodes, _) =
                        sov_collector::store::all_nodes(store, MAX_ROWS as usize).await?;
                    let t0 = Instant::now();
                    let mut n = 0;
                    for node in nodes
                        .iter()
                        .filter(|n| n.missing > 0)
                        .take(MAX_NODES_WITH_RANGES)
                    {
                        n += store
                            .missing_ranges(&node.node, node.epoch, MAX_RANGES_PER_NODE)
                            .await?
                            .len();
                    }
                    // Only the ranges' reads: the node list is timed apart.
                    if rep > 0 {
                        samples.push(t0.elapsed());
                    }
                    n
                }
                "gpu usage 30d" => store.gpu_usage(from30, now, MAX_ROWS).await?.len(),
                "training 30d" => store.list_training(from30, MAX_ROWS).await?.len(),
                "egress 30d verdict" => store.egress(egress(from30, "verdict")).await?.0.len(),
                "egress 30d contested" => store.egress(egress(from30, "contested")).await?.0.len(),
                "egress 7d country" => store.egress(egress(from7, "country")).await?.0.len(),
                _ => store.egress(egress(from7, "process")).await?.0.len(),
            };
            if rep > 0 && part != "missing ranges" {
                samples.push(t.elapsed());
            }
        }
        samples.sort();
        let p50 = samples[(samples.len().max(1) - 1) / 2].as_secs_f64() * 1000.0;
        let p50 = (p50 * 10.0).round() / 10.0;
        eprintln!("  part {part:<24} p50 {p50:>9.1} ms  ({rows} rows)");
        out.push((part.to_owned(), p50, rows));
    }
    Ok(out)
}

/// The indexes issue 14 added for these questions (dropped with `--drop-indexes`).
const NEW_INDEXES: [&str; 1] = ["flows_minute_contested"];

/// The store's own hourly rollup up to `before`.
async fn roll_up(store: &dyn Store, before: i64) -> anyhow::Result<String> {
    Ok(format!("{:?}", store.roll_up(before).await?))
}

struct StoreRun {
    store: &'static str,
    build_secs: f64,
    rollup_secs: f64,
    bytes: u64,
    node_days: f64,
    counts: BTreeMap<&'static str, u64>,
    queries: Vec<(String, f64, f64, String)>,
    parts: Vec<(String, f64, usize)>,
    levels: Value,
}

async fn run_store(
    name: &'static str,
    shape: &Shape,
    store: Arc<dyn Store>,
    loader: &mut Loader,
    signer: Arc<sov_evidence::report::ReportSigner>,
    reuse: bool,
) -> anyhow::Result<StoreRun> {
    let reps = arg("--reps", 5) as usize;
    let parts = async |store: &dyn Store| -> anyhow::Result<Vec<(String, f64, usize)>> {
        if flag("--parts") {
            time_parts(store, shape.now, reps).await
        } else {
            Ok(Vec::new())
        }
    };
    if reuse {
        let parts = parts(store.as_ref()).await?;
        eprintln!("{name}: reusing the store kept by --keep (no build, no rollup)");
        let svc = QueryService::new(store, "bench".into(), 1000).with_evidence(Some(signer), None);
        let queries = ask_all(&svc, shape.now, reps, &text_arg("--only", "")).await?;
        return Ok(StoreRun {
            store: name,
            build_secs: 0.0,
            rollup_secs: 0.0,
            bytes: loader.bytes().await?,
            node_days: shape.nodes as f64 * (shape.now - shape.start) as f64 / DAY as f64,
            counts: BTreeMap::new(),
            queries,
            parts,
            levels: Value::Null,
        });
    }
    let t = Instant::now();
    let counts = build(shape, loader, store.as_ref()).await?;
    if flag("--drop-indexes") {
        for ix in NEW_INDEXES {
            loader.exec(&format!("DROP INDEX IF EXISTS {ix}")).await?;
        }
    }
    let build_secs = t.elapsed().as_secs_f64();
    eprintln!("{name}: built in {build_secs:.1} s: {counts:?}");
    let t = Instant::now();
    if !flag("--no-rollup") {
        // As the collector's loop does by default: minutes older than two minutes.
        let before = shape.now - arg("--rollup-after-minutes", 2) as i64 * MINUTE;
        let stats = roll_up(store.as_ref(), before).await?;
        eprintln!("{name}: rolled up: {stats}");
        loader.finish().await?;
    }
    let rollup_secs = t.elapsed().as_secs_f64();
    let bytes = loader.bytes().await?;
    let node_days = shape.nodes as f64 * (shape.now - shape.start) as f64 / DAY as f64;
    eprintln!(
        "{name}: {bytes} bytes, {:.0} bytes per node-day; rollup {rollup_secs:.1} s",
        bytes as f64 / node_days
    );
    // Bytes per node-day of each level, over the node-days it covers.
    let tables = loader.table_bytes().await;
    let covered = |from: i64| shape.nodes as f64 * (shape.now - from) as f64 / DAY as f64;
    // Node-days of hour rows: the days loaded (see `Shape::hour_day`) down to the minutes,
    // and the minutes rolled up since.
    let hour_node_days = {
        let mut ms = 0i64;
        let mut day = shape.now - shape.now.rem_euclid(DAY);
        while day + DAY > shape.hours_from {
            if shape.hour_day(day) {
                let from = day.max(shape.hours_from);
                ms += (day + DAY).min(shape.now) - from;
            }
            day -= DAY;
        }
        shape.nodes as f64 * ms as f64 / DAY as f64
    };
    // Node-days of rest-of-day rows: the loaded hour days the daily rollup has passed.
    let rest_node_days = {
        let mut days = 0u64;
        let mut day = shape.now - shape.now.rem_euclid(DAY);
        while day >= shape.hours_from {
            if shape.hour_day(day) && day + DAY <= shape.days_up_to() {
                days += 1;
            }
            day -= DAY;
        }
        (shape.nodes * days) as f64
    };
    let level = |names: &[&str], node_days: f64| {
        let b: u64 = names.iter().filter_map(|n| tables.get(*n)).sum();
        json!({"bytes": b, "node_days": (node_days * 100.0).round() / 100.0,
               "bytes_per_node_day": (b as f64 / node_days.max(1e-9)).round()})
    };
    let levels = json!({
        "minutes": level(&["flows_minute", "gpu_usage", "containers_minute"], covered(shape.minutes_from)),
        "hours": level(&["flows_hour", "gpu_usage_hour"], hour_node_days),
        "rest_of_day": level(&["flows_rest"], rest_node_days),
        "fleet": level(&["fleet_hour", "fleet_day", "fleet_rest"], covered(shape.start)),
        "days": level(&["flows_day", "gpu_usage_day"], covered(shape.start)),
        "contested_hours": level(&["contested_hour"], hour_node_days),
        "contested_days": level(&["contested_day"], covered(shape.start)),
        "report_keys": level(&["reports"], covered(shape.keys_from) * if flag("--keys-missing-only") {
            (0..shape.nodes).filter(|&i| node_reports(shape, i).1 > 0).count() as f64 / shape.nodes.max(1) as f64
        } else {
            1.0
        }),
    });
    eprintln!("{name}: levels {levels}");
    let parts = parts(store.as_ref()).await?;
    let svc = QueryService::new(store, "bench".into(), 1000).with_evidence(Some(signer), None);
    let queries = ask_all(
        &svc,
        shape.now,
        arg("--reps", 5) as usize,
        &text_arg("--only", ""),
    )
    .await?;
    Ok(StoreRun {
        store: name,
        build_secs,
        rollup_secs,
        bytes,
        node_days,
        counts,
        queries,
        parts,
        levels,
    })
}

/// The arguments that shape the fleet, with their defaults (kept by `--keep`).
const SHAPE_ARGS: [(&str, u64); 8] = [
    ("--nodes", 1000),
    ("--days", 365),
    ("--interval-secs", 10),
    ("--flows", 50),
    ("--destinations", 3000),
    ("--minute-hours", 2),
    ("--hour-days", 31),
    ("--key-hours", 24),
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // `--keep DIR` builds into DIR and keeps the stores there (SQLite's file, the PostgreSQL
    // schema's name) with the build's instant; `--reuse DIR` asks the questions of those
    // stores again, over the same ranges, without building (before/after on one store).
    let keep = text_arg("--keep", "");
    let reuse = text_arg("--reuse", "");
    let kept: Option<Value> = if reuse.is_empty() {
        None
    } else {
        Some(serde_json::from_str(&std::fs::read_to_string(
            Path::new(&reuse).join("kept.json"),
        )?)?)
    };
    let kept_arg = |name: &str, default: u64| {
        kept.as_ref()
            .and_then(|k| k["args"][name].as_u64())
            .unwrap_or_else(|| arg(name, default))
    };
    let now = match &kept {
        Some(k) => k["now"]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("kept.json has no `now`"))?,
        None => {
            let now = sov_common::clock::now_unix_ms();
            now - now.rem_euclid(MINUTE)
        }
    };
    let arg = kept_arg;
    let days = arg("--days", 365);
    // Days start at midnight UTC: the first day is whole, today is partial.
    let start = now - now.rem_euclid(DAY) - days as i64 * DAY;
    let minutes_from = now - now.rem_euclid(HOUR) - arg("--minute-hours", 2) as i64 * HOUR;
    let hours_from = now - now.rem_euclid(DAY) - arg("--hour-days", 31) as i64 * DAY;
    let keys_from = now - arg("--key-hours", 24) as i64 * HOUR;
    let shape = Shape {
        nodes: arg("--nodes", 1000),
        days,
        interval_secs: arg("--interval-secs", 10).max(1),
        flows: arg("--flows", 50),
        destinations: arg("--destinations", 3000).max(1),
        now,
        start,
        minutes_from: minutes_from.max(start),
        hours_from: hours_from.max(start),
        keys_from: keys_from.max(start),
        all_hours: kept
            .as_ref()
            .and_then(|k| k["all_hours"].as_bool())
            .unwrap_or_else(|| flag("--all-hours")),
        read_hours_only: kept
            .as_ref()
            .and_then(|k| k["read_hours_only"].as_bool())
            .unwrap_or_else(|| flag("--read-hours-only")),
    };
    let stores = text_arg("--stores", "sqlite,postgres");
    eprintln!(
        "bench_volume: {} nodes x {} days, a report every {} s, {} flows per node-minute, {} destinations",
        shape.nodes, shape.days, shape.interval_secs, shape.flows, shape.destinations
    );
    let pki = sov_e2e::Pki::new();
    let signer = Arc::new(sov_evidence::report::ReportSigner::load(
        &pki.collector.cert,
        &pki.collector.key,
    )?);
    let mut runs = Vec::new();
    let mut notes = Vec::new();
    let temp = tempfile::Builder::new()
        .prefix("i14v-volume-")
        .tempdir_in(text_arg("--dir", "/var/tmp"))?;
    let dir = match (keep.as_str(), reuse.as_str()) {
        ("", "") => temp.path().to_path_buf(),
        ("", r) => std::path::PathBuf::from(r),
        (k, _) => {
            std::fs::create_dir_all(k)?;
            std::path::PathBuf::from(k)
        }
    };
    let schema = match &kept {
        Some(k) => k["schema"].as_str().unwrap_or_default().to_owned(),
        None => format!("i14v_volume_{}", std::process::id()),
    };
    if !keep.is_empty() {
        let args: serde_json::Map<String, Value> = SHAPE_ARGS
            .iter()
            .map(|(a, d)| ((*a).to_owned(), json!(arg(a, *d))))
            .collect();
        std::fs::write(
            dir.join("kept.json"),
            json!({"now": now, "schema": schema, "args": args, "all_hours": shape.all_hours,
                   "read_hours_only": shape.read_hours_only})
            .to_string(),
        )?;
    }
    let reusing = kept.is_some();
    if stores.contains("sqlite") {
        let sqlite_dir = dir.join("sqlite");
        let store = Arc::new(SqliteStore::open(&sqlite_dir)?);
        let mut loader = Loader::Sqlite(SqliteLoader::open(&sqlite_dir)?);
        runs.push(
            run_store(
                "sqlite",
                &shape,
                store,
                &mut loader,
                signer.clone(),
                reusing,
            )
            .await?,
        );
    }
    if stores.contains("postgres") {
        let base = sov_e2e::postgres_url();
        match PostgresStore::connect_with_schema(&base, &schema).await {
            Err(e) => {
                let note = format!("postgres SKIPPED: not reachable at {base}: {e}");
                eprintln!("{note}");
                notes.push(note);
            }
            Ok(store) => {
                let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("SET search_path TO {schema}"))
                    .await?;
                let mut loader = Loader::Pg(PgLoader {
                    client,
                    schema: schema.clone(),
                });
                let run = run_store(
                    "postgres",
                    &shape,
                    Arc::new(store),
                    &mut loader,
                    signer,
                    reusing,
                )
                .await;
                if keep.is_empty() && !reusing || flag("--drop") {
                    let _ = loader.exec(&format!("DROP SCHEMA {schema} CASCADE")).await;
                }
                runs.push(run?);
            }
        }
    }
    let queries: Vec<Value> = runs
        .iter()
        .flat_map(|r| {
            r.queries.iter().map(|(q, p50, p99, _)| {
                json!({"query": q, "store": r.store, "p50_ms": p50, "p99_ms": p99})
            })
        })
        .collect();
    let builds: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "store": r.store,
                "build_secs": (r.build_secs * 10.0).round() / 10.0,
                "rollup_secs": (r.rollup_secs * 10.0).round() / 10.0,
                "bytes": r.bytes,
                "bytes_per_node_day": (r.bytes as f64 / r.node_days).round(),
                "rows": r.counts,
                "levels": r.levels,
                "parts": r.parts.iter().map(|(p, ms, n)| json!({"part": p, "p50_ms": ms, "rows": n})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let line = json!({
        "queries": queries,
        "builds": builds,
        "nodes": shape.nodes,
        "days": shape.days,
        "interval_secs": shape.interval_secs,
        "flows_per_node_minute": shape.flows,
        "minute_hours": arg("--minute-hours", 2),
        "hour_days": arg("--hour-days", 31),
        "key_hours": arg("--key-hours", 24),
        "rollup": !flag("--no-rollup"),
        "read_hours_only": shape.read_hours_only,
        "dropped_indexes": flag("--drop-indexes"),
        "notes": notes,
    });
    if flag("--json") {
        println!("{line}");
    } else {
        println!("{}", serde_json::to_string_pretty(&line)?);
    }
    Ok(())
}
