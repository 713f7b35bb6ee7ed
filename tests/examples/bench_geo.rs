//! Geolocation lookups per second on one core: the embedded table, a MaxMind database and a
//! registry delegated file, each raw (the source alone), through `Geo::lookup` with distinct
//! addresses (every lookup a cache miss), and through `Geo::lookup` with a working set of
//! 10,000 addresses repeating (cache hits); then **every source at once** (overrides, the
//! mmdb, an RFC 8805 geofeed, the delegated file, the embedded table: every one answers each
//! lookup), and the verdict a flow stores (lookup + the speed-of-light check of every answer +
//! its JSON), and the physics check's own cost: decoding the country geometry, a point-to-
//! country distance and a country-to-country distance uncached, and a check cached. Target:
//! ≥ 1,000,000 verdicts/s for repeating addresses.
//!
//! ```sh
//! cargo run --release -p sov-e2e --example bench_geo -- [--distinct 1000000] [--repeat 5000000] [--mmdb FILE]
//! cargo run --release -p sov-e2e --example bench_geo -- --mmdb target/geo-data/iptoasn-country.mmdb
//! ```
//!
//! The bench writes its own databases: a GeoLite2-style country `.mmdb` (an IPv6 tree with
//! IPv4 under `::/96`; every IPv4 /16 placed, 200,000 random /24s placed differently, 50,000
//! IPv6 networks) with the collector's test writer, and a delegated file tiling the IPv4
//! space with ~130,000 records. `--mmdb FILE` adds a real database. Every measurement runs on
//! the calling thread; each is the best of 3 rounds.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sov_collector::config::GeoConfig;
use sov_collector::geo::physics::{Physics, Place};
use sov_collector::geo::shapes::Countries;
use sov_collector::geo::testutil::{MmdbWriter, Value};
use sov_collector::geo::{Geo, GeoSource, delegated::Delegated, embedded::Embedded, mmdb::Mmdb};
use sov_collector::ingest::verdict_columns;

const TARGET_PER_SEC: f64 = 1_000_000.0;
const WORKING_SET: usize = 10_000;
const ROUNDS: usize = 3;
const COUNTRIES: [&str; 24] = [
    "US", "CN", "JP", "DE", "GB", "FR", "KR", "BR", "IT", "CA", "NL", "AU", "RU", "IN", "ES", "SE",
    "MA", "ZA", "NG", "EG", "MX", "AR", "PL", "TR",
];

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn country(&mut self) -> &'static str {
        COUNTRIES[self.below(COUNTRIES.len() as u64) as usize]
    }
}

/// Public-looking IPv4 addresses (1.0.0.0 to 223.255.255.255), and one in ten IPv6 in 2000::/3.
fn addresses(rng: &mut Rng, n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            if i % 10 == 9 {
                let hi = 0x2000_u128 | u128::from(rng.below(0x2000));
                IpAddr::V6(Ipv6Addr::from_bits(
                    (hi << 112) | (u128::from(rng.next()) << 48),
                ))
            } else {
                let v = 0x0100_0000 + rng.below(0xdf00_0000) as u32;
                IpAddr::V4(Ipv4Addr::from_bits(v))
            }
        })
        .collect()
}

fn record(cc: &str) -> Value {
    Value::map([
        (
            "continent",
            Value::map([
                ("code", Value::str("EU")),
                ("geoname_id", Value::U32(6_255_148)),
            ]),
        ),
        (
            "country",
            Value::map([
                ("geoname_id", Value::U32(3_017_382)),
                ("iso_code", Value::str(cc)),
                (
                    "names",
                    Value::map([("en", Value::str("Country")), ("fr", Value::str("Pays"))]),
                ),
            ]),
        ),
        (
            "registered_country",
            Value::map([("iso_code", Value::str(cc))]),
        ),
    ])
}

fn write_mmdb(path: &Path, rng: &mut Rng) -> anyhow::Result<()> {
    let mut w = MmdbWriter::new(6, "Bench-Country", 1_793_491_200);
    let err = |e: String| anyhow::anyhow!(e);
    for b in 0..=0xffff_u32 {
        w.insert(
            IpAddr::V4(Ipv4Addr::from_bits(b << 16)),
            16,
            record(rng.country()),
        )
        .map_err(err)?;
    }
    for _ in 0..200_000 {
        let net = (rng.below(1 << 24) as u32) << 8;
        w.insert(
            IpAddr::V4(Ipv4Addr::from_bits(net)),
            24,
            record(rng.country()),
        )
        .map_err(err)?;
    }
    for _ in 0..50_000 {
        let len = 32 + rng.below(17) as u8;
        let bits =
            (0x2000_u128 | u128::from(rng.below(0x2000))) << 112 | u128::from(rng.next()) << 48;
        let net = bits & !(u128::MAX >> len);
        w.insert(
            IpAddr::V6(Ipv6Addr::from_bits(net)),
            len,
            record(rng.country()),
        )
        .map_err(err)?;
    }
    std::fs::write(path, w.to_bytes())?;
    Ok(())
}

fn write_delegated(path: &Path, rng: &mut Rng) -> anyhow::Result<()> {
    let mut out = String::from("2|bench|20261101|0|19830705|20261031|+0000\n");
    out.push_str("bench|*|ipv4|*|0|summary\n");
    let mut at: u64 = 0x0100_0000;
    while at < 0xe000_0000 {
        let count = 256u64 << rng.below(9);
        if rng.below(8) != 0 {
            out.push_str(&format!(
                "bench|{}|ipv4|{}|{count}|20100101|allocated|x\n",
                rng.country(),
                Ipv4Addr::from_bits(at as u32)
            ));
        }
        at += count;
    }
    for i in 0..20_000u128 {
        let net = Ipv6Addr::from_bits((0x2001_u128 << 112) | (i << 96));
        out.push_str(&format!(
            "bench|{}|ipv6|{net}|32|20100101|allocated|x\n",
            rng.country()
        ));
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// An RFC 8805 geofeed of 20,000 /24s (a cloud's regions), some placed apart from the mmdb.
fn write_geofeed(path: &Path, rng: &mut Rng) -> anyhow::Result<()> {
    let mut out = String::from("# bench geofeed\n");
    for _ in 0..20_000 {
        let net = (0x0100_0000 + rng.below(0xdf00_0000) as u32) & 0xffff_ff00;
        out.push_str(&format!(
            "{}/24,{},,,\n",
            Ipv4Addr::from_bits(net),
            rng.country()
        ));
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// What the speed-of-light check costs.
struct PhysicsCosts {
    decode_ms: f64,
    countries: usize,
    point_us_mean: f64,
    point_us_max: f64,
    pair_us_mean: f64,
    pair_us_max: f64,
    cached_ns: f64,
}

/// Decode the geometry once, then: Rabat to every country and Morocco to every country
/// uncached (each a fresh cache), and the check of a cached (site, country).
fn physics_costs(geo: &Geo, repeat: &[IpAddr]) -> PhysicsCosts {
    let started = Instant::now();
    let shapes = Countries::shipped();
    let decode_ms = started.elapsed().as_secs_f64() * 1000.0;
    let codes: Vec<String> = COUNTRY_CODES
        .iter()
        .filter(|c| shapes.get(c).is_some())
        .map(|c| (*c).to_owned())
        .collect();
    let time_each = |from: &Place| -> (f64, f64) {
        let mut total = 0.0;
        let mut max = 0.0f64;
        for c in &codes {
            let fresh = Physics::default();
            let t = Instant::now();
            black_box(fresh.distance_km(from, c));
            let us = t.elapsed().as_secs_f64() * 1e6;
            total += us;
            max = max.max(us);
        }
        (total / codes.len() as f64, max)
    };
    let (point_us_mean, point_us_max) = time_each(&Place::Point {
        lat: 34.0209,
        lon: -6.8498,
    });
    let (pair_us_mean, pair_us_max) = time_each(&Place::Country("MA".into()));
    let site = Place::Country("MA".into());
    let p = geo.physics();
    for c in &codes {
        black_box(p.check(&site, c, 400));
    }
    let n = repeat.len().min(1_000_000);
    let t = Instant::now();
    for i in 0..n {
        black_box(p.check(&site, &codes[i % codes.len()], 400));
    }
    let cached_ns = t.elapsed().as_secs_f64() * 1e9 / n as f64;
    PhysicsCosts {
        decode_ms,
        countries: codes.len(),
        point_us_mean,
        point_us_max,
        pair_us_mean,
        pair_us_max,
        cached_ns,
    }
}

/// Every alpha-2 code of the shipped table.
static COUNTRY_CODES: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    let mut v: Vec<&'static str> = sov_collector::geo::shapes::ISO3166_CSV
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(1))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
});

/// Best time of `ROUNDS` runs of `f` over `ips`.
fn best(ips: &[IpAddr], mut f: impl FnMut(IpAddr) -> usize) -> Duration {
    (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            let mut found = 0usize;
            for ip in ips {
                found += f(*ip);
            }
            black_box(found);
            started.elapsed()
        })
        .min()
        .unwrap_or_default()
}

struct Row {
    source: String,
    mode: &'static str,
    lookups: usize,
    took: Duration,
    hit_ratio: f64,
}

impl Row {
    fn per_sec(&self) -> f64 {
        self.lookups as f64 / self.took.as_secs_f64()
    }
}

/// The three measurements of one source.
fn measure(
    label: &str,
    raw: &dyn GeoSource,
    geo: &Geo,
    distinct: &[IpAddr],
    repeat: &[IpAddr],
) -> Vec<Row> {
    let mut hits = 0usize;
    for ip in distinct {
        hits += usize::from(raw.country(sov_collector::geo::normalise(*ip)).is_some());
    }
    let hit_ratio = hits as f64 / distinct.len() as f64;
    let raw_took = best(distinct, |ip| {
        usize::from(raw.country(sov_collector::geo::normalise(ip)).is_some())
    });
    // Distinct addresses: a fresh Geo each round would be fairer to the first round only;
    // the addresses do not repeat within a round, and the cache (bounded) forgets them.
    let miss_took = best(distinct, |ip| geo.lookup(ip).country.len());
    for ip in repeat.iter().take(WORKING_SET) {
        black_box(geo.lookup(*ip));
    }
    let hit_took = best(repeat, |ip| geo.lookup(ip).country.len());
    vec![
        Row {
            source: label.to_owned(),
            mode: "raw source",
            lookups: distinct.len(),
            took: raw_took,
            hit_ratio,
        },
        Row {
            source: label.to_owned(),
            mode: "Geo, distinct",
            lookups: distinct.len(),
            took: miss_took,
            hit_ratio,
        },
        Row {
            source: label.to_owned(),
            mode: "Geo, 10k repeating",
            lookups: repeat.len(),
            took: hit_took,
            hit_ratio,
        },
    ]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n_distinct: usize = arg(&args, "--distinct").map_or(Ok(1_000_000), |v| v.parse())?;
    let n_repeat: usize = arg(&args, "--repeat").map_or(Ok(5_000_000), |v| v.parse())?;
    let real_mmdb = arg(&args, "--mmdb").map(PathBuf::from);

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let distinct = addresses(&mut rng, n_distinct);
    let working_set = addresses(&mut rng, WORKING_SET);
    let repeat: Vec<IpAddr> = (0..n_repeat)
        .map(|_| working_set[rng.below(WORKING_SET as u64) as usize])
        .collect();

    let dir = tempfile::Builder::new().prefix("bench-geo-").tempdir()?;
    let mmdb_path = dir.path().join("Bench-Country.mmdb");
    let delegated_path = dir.path().join("delegated-bench-extended-latest");
    let started = Instant::now();
    write_mmdb(&mmdb_path, &mut rng)?;
    write_delegated(&delegated_path, &mut rng)?;
    eprintln!(
        "wrote {} ({:.1} MB) and {} ({:.1} MB) in {:.1} s",
        mmdb_path.display(),
        std::fs::metadata(&mmdb_path)?.len() as f64 / 1e6,
        delegated_path.display(),
        std::fs::metadata(&delegated_path)?.len() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    let only = |path: &Path| -> anyhow::Result<Geo> {
        Geo::from_config(&GeoConfig {
            databases: vec![path.to_owned()],
            overrides: vec![],
        })
        .with_context(|| format!("loading {}", path.display()))
    };
    let mut rows = Vec::new();
    eprintln!("embedded …");
    rows.extend(measure(
        "embedded (iptocc)",
        &Embedded,
        &Geo::embedded_only(),
        &distinct,
        &repeat,
    ));
    let open_mmdb =
        |path: &Path| -> anyhow::Result<Mmdb> { Ok(Mmdb::from_bytes(path, std::fs::read(path)?)?) };
    eprintln!("mmdb …");
    rows.extend(measure(
        "mmdb (written by the bench)",
        &open_mmdb(&mmdb_path)?,
        &only(&mmdb_path)?,
        &distinct,
        &repeat,
    ));
    eprintln!("delegated …");
    let delegated_bytes = std::fs::read(&delegated_path)?;
    rows.extend(measure(
        "delegated (written by the bench)",
        &Delegated::parse(&delegated_path, &delegated_bytes, None)?,
        &only(&delegated_path)?,
        &distinct,
        &repeat,
    ));
    if let Some(path) = &real_mmdb {
        eprintln!("{} …", path.display());
        let db = open_mmdb(path)?;
        let label = format!("mmdb {}", db.name());
        rows.extend(measure(&label, &db, &only(path)?, &distinct, &repeat));
    }

    eprintln!("every source …");
    let geofeed_path = dir.path().join("bench.geofeed.csv");
    write_geofeed(&geofeed_path, &mut rng)?;
    let mut databases = vec![
        mmdb_path.clone(),
        geofeed_path.clone(),
        delegated_path.clone(),
    ];
    databases.extend(real_mmdb.clone());
    let all = Geo::from_config(&GeoConfig {
        databases,
        overrides: (0..100u32)
            .map(|i| sov_collector::config::GeoOverride {
                cidr: format!("{}/24", Ipv4Addr::from_bits(0x0a00_0000 | (i << 8))),
                country: "MA".into(),
                ..Default::default()
            })
            .collect(),
    })?;
    let sources = all.builds().len();
    let label = format!("every source ({sources})");
    let miss_took = best(&distinct, |ip| all.lookup(ip).answers.len());
    let contested = distinct
        .iter()
        .filter(|ip| all.lookup(**ip).contested)
        .count();
    let hit_took = best(&repeat, |ip| all.lookup(ip).answers.len());
    rows.push(Row {
        source: label.clone(),
        mode: "Geo, distinct",
        lookups: distinct.len(),
        took: miss_took,
        hit_ratio: contested as f64 / distinct.len() as f64,
    });
    rows.push(Row {
        source: label.clone(),
        mode: "Geo, 10k repeating",
        lookups: repeat.len(),
        took: hit_took,
        hit_ratio: contested as f64 / distinct.len() as f64,
    });
    let physics = physics_costs(&all, &repeat);
    // What ingest stores per flow: the verdict, every answer checked from a site at 0.4 ms,
    // the answers as JSON.
    let site = Place::Point {
        lat: 34.0209,
        lon: -6.8498,
    };
    for ip in repeat.iter().take(WORKING_SET) {
        black_box(verdict_columns(&all, &all.lookup(*ip), Some(&site), 400));
    }
    let stored_took = best(&repeat, |ip| {
        verdict_columns(&all, &all.lookup(ip), Some(&site), 400)
            .answers_json
            .len()
    });
    rows.push(Row {
        source: label,
        mode: "stored verdict",
        lookups: repeat.len(),
        took: stored_took,
        hit_ratio: contested as f64 / distinct.len() as f64,
    });

    println!(
        "{:<36} {:<20} {:>10} {:>9} {:>14} {:>8}",
        "source", "mode (one core)", "lookups", "seconds", "lookups/s", "found"
    );
    for r in &rows {
        println!(
            "{:<36} {:<20} {:>10} {:>9.3} {:>14.0} {:>7.1}%",
            r.source,
            r.mode,
            r.lookups,
            r.took.as_secs_f64(),
            r.per_sec(),
            r.hit_ratio * 100.0
        );
    }
    println!("(found: the share of addresses placed; for every source, the share contested)");
    println!(
        "physics: geometry decode {:.1} ms ({} countries); point to country uncached {:.1} µs mean, \
         {:.1} µs max; country to country uncached {:.1} µs mean, {:.1} µs max; cached check {:.0} ns",
        physics.decode_ms,
        physics.countries,
        physics.point_us_mean,
        physics.point_us_max,
        physics.pair_us_mean,
        physics.pair_us_max,
        physics.cached_ns
    );
    let cached: Vec<&Row> = rows
        .iter()
        .filter(|r| r.mode.contains("repeating") || r.mode == "stored verdict")
        .collect();
    let met = cached.iter().all(|r| r.per_sec() >= TARGET_PER_SEC);
    let slowest = cached
        .iter()
        .map(|r| r.per_sec())
        .fold(f64::INFINITY, f64::min);
    println!(
        "repeating addresses: slowest {slowest:.0} lookups/s (target >= {TARGET_PER_SEC:.0}): {}",
        if met { "MET" } else { "NOT MET" }
    );
    let json = serde_json::json!({
        "bench": "geo",
        "rounds": ROUNDS,
        "working_set": WORKING_SET,
        "results": rows.iter().map(|r| serde_json::json!({
            "source": r.source,
            "mode": r.mode,
            "lookups": r.lookups,
            "seconds": r.took.as_secs_f64(),
            "lookups_per_sec": r.per_sec(),
            "found_ratio": r.hit_ratio,
        })).collect::<Vec<_>>(),
        "physics": {
            "geometry_decode_ms": physics.decode_ms,
            "countries": physics.countries,
            "point_to_country_uncached_us_mean": physics.point_us_mean,
            "point_to_country_uncached_us_max": physics.point_us_max,
            "country_to_country_uncached_us_mean": physics.pair_us_mean,
            "country_to_country_uncached_us_max": physics.pair_us_max,
            "check_cached_ns": physics.cached_ns,
        },
        "target_lookups_per_sec": TARGET_PER_SEC,
        "slowest_repeating_lookups_per_sec": slowest,
        "target_met": met,
    });
    println!("{json}");
    Ok(())
}
