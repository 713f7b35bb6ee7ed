//! Tests of [`Geo`] as a whole: order of sources, normalisation, reload, validation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::testutil::{MmdbWriter, Value};
use super::*;
use super::{GeoConfig, GeoOverride};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const DELEGATED: &str = "\
2|ripencc|20261101|4|19830705|20261031|+0100
ripencc|*|ipv4|*|2|summary
ripencc|*|ipv6|*|1|summary
ripencc|*|asn|*|1|summary
ripencc|FR|asn|3215|1|19930901|allocated|abc
ripencc|FR|ipv4|2.0.0.0|1048576|20100712|allocated|abc
ripencc|DE|ipv4|5.10.0.0|768|20120101|assigned|def
ripencc|NL|ipv6|2a02:a000::|20|20050101|allocated|ghi
";

/// 2026-11-01T00:00:00Z.
const EPOCH: u64 = 1_793_491_200;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Write to a temporary file in the same directory, then rename over `path`.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn cfg(databases: Vec<PathBuf>, overrides: Vec<GeoOverride>) -> GeoConfig {
    GeoConfig {
        databases,
        overrides,
    }
}

fn ovr(cidr: &str, country: &str, asn: Option<u32>, org: Option<&str>) -> GeoOverride {
    GeoOverride {
        cidr: cidr.to_owned(),
        country: country.to_owned(),
        asn,
        org: org.map(str::to_owned),
        operator_country: None,
    }
}

fn asn_mmdb() -> Vec<u8> {
    let mut w = MmdbWriter::new(6, "GeoLite2-ASN", EPOCH);
    for (net, len, asn, org) in [
        ("2.0.0.0", 12, 3215, "Orange S.A."),
        ("8.8.8.0", 24, 15169, "GOOGLE"),
        ("10.1.0.0", 16, 64501, "Private Net"),
    ] {
        w.insert(
            ip(net),
            len,
            Value::map([
                ("autonomous_system_number", Value::U32(asn)),
                ("autonomous_system_organization", Value::str(org)),
            ]),
        )
        .unwrap();
    }
    w.to_bytes()
}

fn country_mmdb(cc_for_8: &str) -> Vec<u8> {
    let mut w = MmdbWriter::new(6, "GeoLite2-Country", EPOCH);
    for (net, len, cc) in [("8.8.8.0", 24, cc_for_8), ("10.0.0.0", 8, "BE")] {
        w.insert(
            ip(net),
            len,
            Value::map([("country", Value::map([("iso_code", Value::str(cc))]))]),
        )
        .unwrap();
    }
    w.to_bytes()
}

#[test]
fn normalise_turns_mapped_and_6to4_addresses_into_ipv4_and_leaves_others() {
    assert_eq!(normalise(ip("::ffff:8.8.8.8")), ip("8.8.8.8"));
    assert_eq!(normalise(ip("2002:0808:0808::1")), ip("8.8.8.8"));
    assert_eq!(normalise(ip("2002:c000:0204:1::5")), ip("192.0.2.4"));
    assert_eq!(normalise(ip("2001:db8::1")), ip("2001:db8::1"));
    assert_eq!(normalise(ip("::1")), ip("::1"));
    assert_eq!(normalise(ip("8.8.4.4")), ip("8.8.4.4"));
}

#[test]
fn the_embedded_table_alone_places_public_addresses_and_not_private_ones() {
    let geo = Geo::embedded_only();
    let v = geo.lookup(ip("8.8.8.8"));
    assert_eq!(v.country, "US");
    assert_eq!(v.source, embedded::EMBEDDED_BUILD);
    assert_eq!(
        (v.asn, v.org.as_str(), v.asn_source.as_str()),
        (None, "", "")
    );
    assert_eq!(geo.lookup(ip("::ffff:8.8.8.8")), v);
    assert_eq!(geo.lookup(ip("2002:0808:0808::1")), v);
    assert_eq!(*geo.lookup(ip("192.168.1.1")), Verdict::default());
    assert_eq!(geo.builds(), [embedded::EMBEDDED_BUILD]);
}

#[test]
fn a_delegated_file_answers_and_an_address_outside_falls_through_to_the_next_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = write(
        dir.path(),
        "delegated-ripencc-extended-latest",
        DELEGATED.as_bytes(),
    );
    let geo = Geo::from_config(&cfg(vec![d], vec![])).unwrap();
    let v = geo.lookup(ip("2.1.2.3"));
    assert_eq!(v.country, "FR");
    assert_eq!(
        v.source,
        "delegated:delegated-ripencc-extended-latest@2026-11-01"
    );
    assert_eq!(geo.lookup(ip("5.10.2.9")).country, "DE");
    assert_eq!(geo.lookup(ip("2a02:a00f::1")).country, "NL");
    // Not in the file: the embedded table answers.
    let v = geo.lookup(ip("8.8.8.8"));
    assert_eq!(
        (v.country.as_str(), v.source.as_str()),
        ("US", embedded::EMBEDDED_BUILD)
    );
    assert_eq!(
        geo.builds(),
        [
            "delegated:delegated-ripencc-extended-latest@2026-11-01",
            embedded::EMBEDDED_BUILD
        ]
    );
}

#[test]
fn countries_and_asns_come_from_the_first_source_that_knows_each() {
    let dir = tempfile::tempdir().unwrap();
    let asn = write(dir.path(), "GeoLite2-ASN.mmdb", &asn_mmdb());
    let country = write(dir.path(), "GeoLite2-Country.mmdb", &country_mmdb("US"));
    let csv = write(
        dir.path(),
        "asn.csv",
        b"8.8.8.0,8.8.8.255,99999,\"Shadowed, Inc.\"\n9.9.9.0,9.9.9.255,19281,\"Quad9, Inc.\"\n",
    );
    let geo = Geo::from_config(&cfg(vec![asn, country, csv], vec![])).unwrap();
    let v = geo.lookup(ip("8.8.8.8"));
    assert_eq!(
        *v,
        Verdict {
            country: "US".into(),
            asn: Some(15169),
            org: "GOOGLE".into(),
            source: "mmdb:GeoLite2-Country@2026-11-01".into(),
            asn_source: "mmdb:GeoLite2-ASN@2026-11-01".into(),
            answers: vec![
                Answer {
                    source: "mmdb:GeoLite2-Country@2026-11-01".into(),
                    country: "US".into(),
                    kind: SourceKind::Database,
                },
                Answer {
                    source: embedded::EMBEDDED_BUILD.into(),
                    country: "US".into(),
                    kind: SourceKind::Registry,
                },
            ],
            contested: false,
            operator_country: String::new(),
            operator_source: String::new(),
        }
    );
    let v = geo.lookup(ip("9.9.9.9"));
    assert_eq!((v.asn, v.org.as_str()), (Some(19281), "Quad9, Inc."));
    assert_eq!(v.asn_source, "csv:asn.csv");
    assert_eq!(v.source, embedded::EMBEDDED_BUILD);
}

#[test]
fn overrides_win_over_every_database_and_the_longest_prefix_wins() {
    let dir = tempfile::tempdir().unwrap();
    let asn = write(dir.path(), "GeoLite2-ASN.mmdb", &asn_mmdb());
    let country = write(dir.path(), "GeoLite2-Country.mmdb", &country_mmdb("US"));
    let d = write(
        dir.path(),
        "delegated-ripencc-extended-latest",
        DELEGATED.as_bytes(),
    );
    let geo = Geo::from_config(&cfg(
        vec![asn, country, d],
        vec![
            ovr("8.8.8.8/32", "MA", None, None),
            ovr("10.0.0.0/8", "FR", Some(64500), Some("Acme")),
            ovr("10.1.2.0/24", "DE", None, None),
            ovr("2.0.0.0/8", "ES", None, Some("Telco")),
        ],
    ))
    .unwrap();
    // Over the country mmdb; the ASN still comes from the ASN database.
    let v = geo.lookup(ip("8.8.8.8"));
    assert_eq!(
        (v.country.as_str(), v.source.as_str()),
        ("MA", "override:8.8.8.8/32")
    );
    assert_eq!(
        (v.asn, v.asn_source.as_str()),
        (Some(15169), "mmdb:GeoLite2-ASN@2026-11-01")
    );
    // Over mmdb country and ASN.
    let v = geo.lookup(ip("10.9.0.1"));
    assert_eq!(
        (
            v.country.as_str(),
            v.asn,
            v.org.as_str(),
            v.source.as_str(),
            v.asn_source.as_str()
        ),
        (
            "FR",
            Some(64500),
            "Acme",
            "override:10.0.0.0/8",
            "override:10.0.0.0/8"
        )
    );
    assert_eq!(v.answers[0].kind, SourceKind::Override);
    assert!(!v.contested, "an override decides");
    // Longest prefix: the /24 places it, with no ASN of its own; the ASN database answers.
    let v = geo.lookup(ip("10.1.2.3"));
    assert_eq!(
        (v.country.as_str(), v.source.as_str()),
        ("DE", "override:10.1.2.0/24")
    );
    assert_eq!((v.asn, v.org.as_str()), (Some(64501), "Private Net"));
    // Over the delegated file; an organisation without ASN answers the ASN question.
    let v = geo.lookup(ip("2.1.2.3"));
    assert_eq!(
        (v.country.as_str(), v.asn, v.org.as_str()),
        ("ES", None, "Telco")
    );
    assert_eq!(geo.builds()[0], overrides::OVERRIDES_BUILD);
}

#[test]
fn a_bad_override_fails_from_config_naming_the_entry() {
    let e = Geo::from_config(&cfg(
        vec![],
        vec![
            ovr("10.0.0.0/8", "FR", None, None),
            ovr("10.0.0.0/40", "FR", None, None),
        ],
    ))
    .unwrap_err();
    assert!(matches!(e, GeoError::Override { index: 1, .. }), "{e:?}");
    assert!(e.to_string().contains("geo.override[1]"), "{e}");
}

#[test]
fn validate_lists_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "delegated-ripencc-extended-latest",
        DELEGATED.as_bytes(),
    );
    let gz = write(
        dir.path(),
        "GeoLite2-Country.mmdb.gz",
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00",
    );
    let bad_line = write(
        dir.path(),
        "c.csv",
        b"1.0.0.0,1.0.0.255,AU\n1.0.1.0,1.0.1.255,Australia\n",
    );
    let c = cfg(
        vec![dir.path().join("missing.mmdb"), good, gz, bad_line],
        vec![
            ovr("10.0.0.0/33", "FR", None, None),
            ovr("10.0.0.0/8", "france", None, None),
            ovr("192.168.0.0/16", "FR", None, None),
        ],
    );
    let problems = validate(&c);
    assert_eq!(problems.len(), 5, "{problems:#?}");
    let all = problems.join("\n");
    for needle in [
        "geo.override[0]",
        "prefix length 33",
        "geo.override[1]",
        "\"france\"",
        "geo.databases[0]: cannot read",
        "missing.mmdb",
        "geo.databases[2]",
        "gzip",
        "geo.databases[3]",
        "c.csv:2:",
    ] {
        assert!(all.contains(needle), "missing {needle} in\n{all}");
    }
    assert!(!all.contains("geo.databases[1]"), "{all}");
    assert!(!all.contains("geo.override[2]"), "{all}");
    assert!(validate(&GeoConfig::default()).is_empty());
}

#[test]
fn repeated_lookups_are_answered_from_the_cache_with_the_same_verdict() {
    let geo = Geo::embedded_only();
    let first = geo.lookup(ip("8.8.8.8"));
    assert_eq!(geo.snapshot().cache.len(), 1);
    assert_eq!(geo.lookup(ip("::ffff:8.8.8.8")), first);
    assert_eq!(
        geo.snapshot().cache.len(),
        1,
        "the normalised address is the key"
    );
    let clone = geo.clone();
    assert_eq!(clone.lookup(ip("8.8.8.8")), first);
}

#[test]
fn a_database_replaced_on_disk_is_swapped_in_while_lookups_run_without_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "GeoLite2-Country.mmdb", &country_mmdb("US"));
    let geo = Geo::from_config(&cfg(vec![path.clone()], vec![])).unwrap();
    assert!(!geo.reload_if_changed(), "nothing changed yet");
    assert_eq!(geo.lookup(ip("8.8.8.8")).country, "US");

    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (geo, stop, lookups) = (geo.clone(), Arc::clone(&stop), Arc::clone(&lookups));
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for a in ["8.8.8.8", "10.2.3.4"] {
                    let v = geo.lookup(ip(a));
                    let ok = match a {
                        "8.8.8.8" => v.country == "US" || v.country == "CA",
                        _ => v.country == "BE",
                    };
                    if !ok {
                        seen.push(v);
                    }
                    lookups.fetch_add(1, Ordering::Relaxed);
                }
            }
            seen
        })
    };
    for (round, cc) in ["CA", "US", "CA"].into_iter().enumerate() {
        // Same size, new inode: only the inode and perhaps the mtime tell.
        replace(&path, &country_mmdb(cc));
        assert!(geo.reload_if_changed(), "round {round}");
        assert_eq!(geo.lookup(ip("8.8.8.8")).country, cc, "round {round}");
        assert!(!geo.reload_if_changed(), "round {round}: reloaded twice");
    }
    // A broken replacement keeps the loaded build, and is not retried until it changes.
    replace(&path, b"not a database at all\n");
    assert!(!geo.reload_if_changed());
    assert!(!geo.reload_if_changed());
    assert_eq!(geo.lookup(ip("8.8.8.8")).country, "CA");
    // A vanished file too.
    std::fs::remove_file(&path).unwrap();
    assert!(!geo.reload_if_changed());
    assert_eq!(geo.lookup(ip("8.8.8.8")).country, "CA");
    replace(&path, &country_mmdb("US"));
    assert!(geo.reload_if_changed());
    assert_eq!(geo.lookup(ip("8.8.8.8")).country, "US");

    while lookups.load(Ordering::Relaxed) < 1000 {
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    let wrong = reader.join().unwrap();
    assert!(
        wrong.is_empty(),
        "lookups that failed during reloads: {wrong:?}"
    );
}

#[test]
fn a_text_database_changed_in_place_is_reloaded_and_the_cache_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "ranges.csv", b"1.2.3.0,1.2.3.255,FR\n");
    let geo = Geo::from_config(&cfg(vec![path.clone()], vec![])).unwrap();
    assert_eq!(geo.lookup(ip("1.2.3.4")).country, "FR");
    // Rewritten in place (same inode), with a different size.
    std::fs::write(&path, b"1.2.3.0,1.2.3.255,DE\n1.2.4.0,1.2.4.255,DE\n").unwrap();
    assert!(geo.reload_if_changed());
    assert_eq!(geo.lookup(ip("1.2.3.4")).country, "DE");
    assert_eq!(geo.snapshot().cache.len(), 1);
}
