//! The regional registries' statistics files, `delegated-<rir>-extended-latest` (and the
//! plain `delegated-<rir>-latest`): `registry|cc|type|start|value|date|status[|opaque-id]`.
//!
//! `ipv4` records give a start address and a count of addresses (not always a power of two);
//! `ipv6` records a start and a prefix length; `asn` records a first ASN and a count, and
//! their country is where the holder of those autonomous systems is registered (the
//! operator's country of a verdict). The version line (`2|ripencc|20261101|…`), summary
//! lines (`ripencc|*|ipv4|*|…|summary`) and records without a country (`available`,
//! `reserved`) are skipped. The build is the file
//! name and the date of the version line (else the file's modification date).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::SystemTime;

use super::ranges::{RangeBuilder, RangeTable};
use super::{GeoError, GeoSource, SourceKind};

/// One registry statistics file.
pub struct Delegated {
    name: String,
    table: RangeTable<String>,
    /// `(first ASN, last ASN, country)`, sorted and disjoint.
    asns: Vec<(u32, u32, String)>,
}

impl std::fmt::Debug for Delegated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (v4, v6) = self.table.counts();
        f.debug_struct("Delegated")
            .field("name", &self.name)
            .field("v4_ranges", &v4)
            .field("v6_ranges", &v6)
            .field("asn_ranges", &self.asns.len())
            .finish()
    }
}

/// `20261101` → `2026-11-01`.
fn header_date(field: &str) -> Option<String> {
    (field.len() == 8 && field.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("{}-{}-{}", &field[..4], &field[4..6], &field[6..]))
}

/// The build of a text source: `<kind>:<file name>@<date>`, the date being the file's own
/// (`date`), else its modification date, else "unknown".
pub(crate) fn build_name(
    kind: &str,
    path: &Path,
    date: Option<String>,
    mtime: Option<SystemTime>,
) -> String {
    let file = path
        .file_name()
        .map_or_else(|| path.to_string_lossy(), |n| n.to_string_lossy());
    let date = date
        .or_else(|| mtime.and_then(iso_date))
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{kind}:{file}@{date}")
}

/// A date as `YYYY-MM-DD` (UTC).
pub(crate) fn iso_date(t: SystemTime) -> Option<String> {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    let d = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?)
        .ok()?
        .date();
    Some(format!(
        "{:04}-{:02}-{:02}",
        d.year(),
        u8::from(d.month()),
        d.day()
    ))
}

impl Delegated {
    /// Parse a statistics file; `path` names the build and errors, `mtime` dates a file
    /// without a version line.
    pub fn parse(
        path: &Path,
        bytes: &[u8],
        mtime: Option<SystemTime>,
    ) -> Result<Delegated, GeoError> {
        let err = |line: usize, message: String| GeoError::Parse {
            path: path.to_owned(),
            line,
            message,
        };
        let text =
            std::str::from_utf8(bytes).map_err(|e| err(0, format!("not UTF-8 text: {e}")))?;
        let mut ranges: RangeBuilder<String> = RangeBuilder::new();
        let mut date = None;
        let mut asns: Vec<(u32, u32, String)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split('|').collect();
            if super::detect::is_version_line(line) {
                // version|registry|serial|records|startdate|enddate|UTCoffset
                date = date.or_else(|| {
                    f.get(2)
                        .and_then(|s| header_date(s))
                        .or_else(|| f.get(5).and_then(|s| header_date(s)))
                });
                continue;
            }
            if f.get(5) == Some(&"summary") {
                continue;
            }
            if f.len() < 7 {
                return Err(err(
                    line_no,
                    format!(
                        "expected registry|cc|type|start|value|date|status, got {} fields",
                        f.len()
                    ),
                ));
            }
            let (cc, kind, start, value, status) = (f[1], f[2], f[3], f[4], f[6]);
            if kind != "ipv4" && kind != "ipv6" && kind != "asn" {
                return Err(err(line_no, format!("unknown record type {kind:?}")));
            }
            if cc.is_empty() || cc == "ZZ" || status == "available" || status == "reserved" {
                continue;
            }
            if cc.len() != 2 || !cc.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(err(
                    line_no,
                    format!("country {cc:?} is not an ISO 3166-1 alpha-2 code"),
                ));
            }
            if kind == "asn" {
                let first: u32 = start
                    .parse()
                    .map_err(|_| err(line_no, format!("ASN {start:?} is not a number")))?;
                let count: u32 = value.parse().ok().filter(|c| *c > 0).ok_or_else(|| {
                    err(line_no, format!("count {value:?} is not a positive number"))
                })?;
                let last = first.checked_add(count - 1).ok_or_else(|| {
                    err(line_no, format!("ASN {first} + {count} runs past 2^32-1"))
                })?;
                asns.push((first, last, cc.to_owned()));
                continue;
            }
            let (first, last) = if kind == "ipv4" {
                let s: Ipv4Addr = start
                    .parse()
                    .map_err(|_| err(line_no, format!("{start:?} is not an IPv4 address")))?;
                let count: u64 = value.parse().ok().filter(|c| *c > 0).ok_or_else(|| {
                    err(line_no, format!("count {value:?} is not a positive number"))
                })?;
                let end = u64::from(s.to_bits()) + count - 1;
                let end = u32::try_from(end).map_err(|_| {
                    err(
                        line_no,
                        format!("{start} + {count} addresses runs past 255.255.255.255"),
                    )
                })?;
                (IpAddr::V4(s), IpAddr::V4(Ipv4Addr::from_bits(end)))
            } else {
                let s: Ipv6Addr = start
                    .parse()
                    .map_err(|_| err(line_no, format!("{start:?} is not an IPv6 address")))?;
                let len: u32 = value.parse().ok().filter(|l| *l <= 128).ok_or_else(|| {
                    err(line_no, format!("prefix length {value:?} is not 0..=128"))
                })?;
                let host = u128::MAX.checked_shr(len).unwrap_or(0);
                let net = s.to_bits() & !host;
                (
                    IpAddr::V6(Ipv6Addr::from_bits(net)),
                    IpAddr::V6(Ipv6Addr::from_bits(net | host)),
                )
            };
            ranges
                .push(first, last, cc.to_owned())
                .map_err(|m| err(line_no, m))?;
        }
        if ranges.is_empty() && asns.is_empty() {
            return Err(err(
                0,
                "no ipv4, ipv6 or asn records with a country".to_owned(),
            ));
        }
        // Registries do not overlap ASN ranges; should a file do so, the first range wins.
        asns.sort_by_key(|a| a.0);
        asns.dedup_by(|b, a| b.0 <= a.1);
        let (table, overlaps) = ranges.build();
        if overlaps > 0 {
            tracing::debug!(path = %path.display(), overlaps, "overlapping ranges: the narrower wins");
        }
        Ok(Delegated {
            name: build_name("delegated", path, date, mtime),
            table,
            asns,
        })
    }
}

impl GeoSource for Delegated {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Registry
    }

    fn country(&self, ip: IpAddr) -> Option<String> {
        self.table.get(ip).cloned()
    }

    fn asn_country(&self, asn: u32) -> Option<String> {
        let i = self.asns.partition_point(|a| a.0 <= asn).checked_sub(1)?;
        let (_, last, cc) = &self.asns[i];
        (asn <= *last).then(|| cc.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small file in the registries' layout, with every kind of line.
    pub(crate) const SAMPLE: &str = "\
# delegated-ripencc-extended-latest, abridged
2|ripencc|20261101|5|19830705|20261031|+0100
ripencc|*|asn|*|1|summary
ripencc|*|ipv4|*|3|summary
ripencc|*|ipv6|*|1|summary
ripencc|FR|asn|3215|1|19930901|allocated|abc
ripencc|FR|ipv4|2.0.0.0|1048576|20100712|allocated|abc
ripencc|DE|ipv4|5.10.0.0|768|20120101|assigned|def
ripencc||ipv4|5.20.0.0|256||available|
ripencc|NL|ipv6|2001:db8::|32|20050101|allocated|ghi
";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_delegated_file_answers_countries_from_ipv4_counts_and_ipv6_prefixes() {
        let d = Delegated::parse(
            Path::new("/x/delegated-ripencc-extended-latest"),
            SAMPLE.as_bytes(),
            None,
        )
        .unwrap();
        assert_eq!(
            d.name(),
            "delegated:delegated-ripencc-extended-latest@2026-11-01"
        );
        assert_eq!(d.country(ip("2.0.0.1")).as_deref(), Some("FR"));
        assert_eq!(d.country(ip("2.15.255.255")).as_deref(), Some("FR"));
        assert_eq!(d.country(ip("2.16.0.0")), None);
        // 768 addresses: 5.10.0.0 to 5.10.2.255.
        assert_eq!(d.country(ip("5.10.2.255")).as_deref(), Some("DE"));
        assert_eq!(d.country(ip("5.10.3.0")), None);
        assert_eq!(d.country(ip("5.20.0.1")), None);
        assert_eq!(d.country(ip("2001:db8:ffff::1")).as_deref(), Some("NL"));
        assert_eq!(d.country(ip("2001:db9::1")), None);
        assert_eq!(d.asn(ip("2.0.0.1")), None);
        // The holder of AS3215 is registered in France; AS3216 is not in the file.
        assert_eq!(d.asn_country(3215).as_deref(), Some("FR"));
        assert_eq!(d.asn_country(3216), None);
        assert_eq!(d.asn_country(1), None);
    }

    #[test]
    fn asn_ranges_give_the_holders_country_and_a_file_of_asns_alone_is_a_source() {
        let body = "2|afrinic|20261101|2|19830705|20261031|+0000\n\
            afrinic|MA|asn|36903|10|20050101|allocated|x\n\
            afrinic|ZA|asn|37100|1|20050101|assigned|y\n";
        let d = Delegated::parse(Path::new("delegated-afrinic"), body.as_bytes(), None).unwrap();
        assert_eq!(d.asn_country(36903).as_deref(), Some("MA"));
        assert_eq!(d.asn_country(36912).as_deref(), Some("MA"));
        assert_eq!(d.asn_country(36913), None);
        assert_eq!(d.asn_country(37100).as_deref(), Some("ZA"));
        assert_eq!(d.country(ip("2.0.0.1")), None);
    }

    #[test]
    fn a_file_without_a_version_line_is_dated_by_its_modification_time() {
        let body = "arin|US|ipv4|8.8.8.0|256|19921201|allocated|x\n";
        let mtime = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_793_491_200);
        let d = Delegated::parse(
            Path::new("delegated-arin-extended-latest"),
            body.as_bytes(),
            Some(mtime),
        )
        .unwrap();
        assert_eq!(
            d.name(),
            "delegated:delegated-arin-extended-latest@2026-11-01"
        );
    }

    #[test]
    fn malformed_records_are_refused_with_their_line_number() {
        for (body, needle) in [
            (
                "2|x|20260101\nripencc|FR|ipv4|2.0.0.0|zero|2010|allocated\n",
                ":2: count",
            ),
            (
                "ripencc|FR|ipv4|2.0.0.0.1|256|2010|allocated\n",
                ":1: \"2.0.0.0.1\"",
            ),
            (
                "ripencc|FR|ipv6|2001:db8::|129|2010|allocated\n",
                ":1: prefix length",
            ),
            (
                "ripencc|fr|ipv4|2.0.0.0|256|2010|allocated\n",
                ":1: country",
            ),
            (
                "ripencc|FR|ipv4|255.255.255.0|512|2010|allocated\n",
                ":1: 255.255.255.0 + 512",
            ),
            ("ripencc|FR|ipv4|2.0.0.0\n", ":1: expected"),
            (
                "2|ripencc|20261101|0|19830705|20261031|+0100\n",
                ":0: no ipv4, ipv6 or asn",
            ),
        ] {
            let e = Delegated::parse(Path::new("d"), body.as_bytes(), None).unwrap_err();
            assert!(e.to_string().contains(needle), "{e} lacks {needle}");
        }
    }
}
