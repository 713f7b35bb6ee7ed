//! RFC 8805 geofeeds: a network operator's own statement of where its prefixes are used,
//! one `ip_prefix,alpha2code,region,city,postal_code` line per prefix (CSV, `#` comments).
//!
//! Only the prefix and the country are read; a line with an empty country ("not stated") is
//! skipped, as RFC 8805 §2.1.1.1 allows. A more specific prefix wins inside a wider one. The
//! build is `geofeed:<file name>@<modification date>` (a geofeed carries no date of its own).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::SystemTime;

use super::csv::split_fields;
use super::delegated::build_name;
use super::overrides::parse_cidr;
use super::ranges::{RangeBuilder, RangeTable};
use super::{GeoError, GeoSource, SourceKind};

/// One geofeed file.
pub struct Geofeed {
    name: String,
    table: RangeTable<String>,
}

impl std::fmt::Debug for Geofeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (v4, v6) = self.table.counts();
        f.debug_struct("Geofeed")
            .field("name", &self.name)
            .field("v4_prefixes", &v4)
            .field("v6_prefixes", &v6)
            .finish()
    }
}

/// Whether a data line looks like a geofeed entry: a prefix with `/`, then a country code
/// or nothing.
pub fn is_geofeed_line(line: &str) -> bool {
    let fields = split_fields(line);
    fields.len() >= 2
        && fields[0].contains('/')
        && parse_cidr(&fields[0]).is_ok()
        && (fields[1].is_empty()
            || (fields[1].len() == 2 && fields[1].bytes().all(|b| b.is_ascii_alphabetic())))
}

impl Geofeed {
    /// Parse a geofeed; `path` names the build and errors, `mtime` dates it.
    pub fn parse(
        path: &Path,
        bytes: &[u8],
        mtime: Option<SystemTime>,
    ) -> Result<Geofeed, GeoError> {
        let err = |line: usize, message: String| GeoError::Parse {
            path: path.to_owned(),
            line,
            message,
        };
        let text =
            std::str::from_utf8(bytes).map_err(|e| err(0, format!("not UTF-8 text: {e}")))?;
        let mut ranges: RangeBuilder<String> = RangeBuilder::new();
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields = split_fields(line);
            let (net, len) = parse_cidr(&fields[0]).map_err(|m| err(line_no, m))?;
            let cc = fields
                .get(1)
                .map(|c| c.to_ascii_uppercase())
                .unwrap_or_default();
            if cc.is_empty() {
                continue;
            }
            if cc.len() != 2 || !cc.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(err(
                    line_no,
                    format!("country {cc:?} is not an ISO 3166-1 alpha-2 code"),
                ));
            }
            let (first, last) = match net {
                IpAddr::V4(v4) => {
                    let host = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
                    (
                        IpAddr::V4(v4),
                        IpAddr::V4(Ipv4Addr::from_bits(v4.to_bits() | host)),
                    )
                }
                IpAddr::V6(v6) => {
                    let host = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
                    (
                        IpAddr::V6(v6),
                        IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() | host)),
                    )
                }
            };
            ranges.push(first, last, cc).map_err(|m| err(line_no, m))?;
        }
        if ranges.is_empty() {
            return Err(err(0, "no prefix with a country".to_owned()));
        }
        let (table, _) = ranges.build();
        Ok(Geofeed {
            name: build_name("geofeed", path, None, mtime),
            table,
        })
    }
}

impl GeoSource for Geofeed {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Geofeed
    }

    fn country(&self, ip: IpAddr) -> Option<String> {
        self.table.get(ip).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FEED: &str = "\
# RFC 8805 geofeed of an example cloud
192.0.2.0/24,FR,FR-IDF,Paris,
192.0.2.128/25,ie,IE-D,Dublin,
2001:db8::/32,ZA,ZA-WC,Cape Town,8001
198.51.100.0/24,,,,
";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_geofeed_places_prefixes_and_the_more_specific_one_wins() {
        let mtime = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_793_491_200);
        let g = Geofeed::parse(
            Path::new("/etc/sov/cloud.geofeed.csv"),
            FEED.as_bytes(),
            Some(mtime),
        )
        .unwrap();
        assert_eq!(g.name(), "geofeed:cloud.geofeed.csv@2026-11-01");
        assert_eq!(g.kind(), SourceKind::Geofeed);
        assert_eq!(g.country(ip("192.0.2.1")).as_deref(), Some("FR"));
        assert_eq!(g.country(ip("192.0.2.200")).as_deref(), Some("IE"));
        assert_eq!(g.country(ip("2001:db8::1")).as_deref(), Some("ZA"));
        assert_eq!(g.country(ip("198.51.100.1")), None, "no country stated");
        assert_eq!(g.country(ip("203.0.113.1")), None);
    }

    #[test]
    fn a_bad_geofeed_line_is_refused_with_its_line_number() {
        for (body, needle) in [
            ("192.0.2.0/33,FR,,,\n", ":1: prefix length"),
            ("192.0.2.0/24,FR,,,\n192.0.2.0/24,FRA,,,\n", ":2: country"),
            ("198.51.100.0/24,,,,\n", ":0: no prefix"),
        ] {
            let e = Geofeed::parse(Path::new("g"), body.as_bytes(), None).unwrap_err();
            assert!(e.to_string().contains(needle), "{e} lacks {needle}");
        }
        assert!(is_geofeed_line("192.0.2.0/24,FR,FR-IDF,Paris,"));
        assert!(is_geofeed_line("2001:db8::/32,,,,"));
        assert!(!is_geofeed_line("1.0.0.0,1.0.0.255,AU"));
    }
}
