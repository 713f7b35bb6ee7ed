//! MaxMind-format databases (`.mmdb`) through `maxminddb`, read over the file's bytes.
//!
//! One decode per lookup reads whatever of these the record has:
//! - country: `country.iso_code` (GeoLite2/GeoIP2, DB-IP), else flat `country_code`
//!   (ip-location-db, IPinfo), else `registered_country.iso_code`;
//! - ASN: `autonomous_system_number` + `autonomous_system_organization` (GeoLite2-ASN,
//!   ip-location-db), else flat `asn` (`15169` or `"AS15169"`) + `as_name`/`as_org`/
//!   `as_domain` (IPinfo), with `organization`/`isp` as last resort for the organisation.
//!
//! A field of an unexpected type is ignored, not an error. The build is
//! `mmdb:<database_type>@<build date>`.

use std::fmt;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{GeoError, GeoSource};

/// Records sampled at load to learn whether the database has countries, ASNs or both.
const SCHEMA_SAMPLE_RECORDS: usize = 4096;

/// One MaxMind database.
pub struct Mmdb {
    name: String,
    reader: maxminddb::Reader<Vec<u8>>,
    /// Whether sampled records carry a country (else `country` is not asked).
    has_country: bool,
    /// Whether sampled records carry an ASN (else `asn` is not asked).
    has_asn: bool,
}

impl fmt::Debug for Mmdb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.reader.metadata();
        f.debug_struct("Mmdb")
            .field("name", &self.name)
            .field("ip_version", &m.ip_version)
            .field("node_count", &m.node_count)
            .field("has_country", &self.has_country)
            .field("has_asn", &self.has_asn)
            .finish()
    }
}

/// A record field read leniently: a string, a number, or the `iso_code` of a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field<'a> {
    Str(&'a str),
    Num(u64),
    IsoCode(&'a str),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor(PhantomData))
    }
}

struct FieldVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for FieldVisitor<'a> {
    type Value = Field<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any MaxMind DB value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Str(v))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Field::Num(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
        Ok(u64::try_from(v).map_or(Field::Other, Field::Num))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(u64::try_from(v).map_or(Field::Other, Field::Num))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }
    fn visit_borrowed_bytes<E: de::Error>(self, _: &'de [u8]) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Field::Other;
        while let Some(key) = map.next_key::<&'de str>()? {
            if key == "iso_code" {
                if let Field::Str(code) = map.next_value::<Field<'a>>()? {
                    out = Field::IsoCode(code);
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

/// The fields we read; every other field is skipped.
#[derive(Debug, Default, Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    country: Option<Field<'a>>,
    #[serde(borrow)]
    country_code: Option<Field<'a>>,
    #[serde(borrow)]
    registered_country: Option<Field<'a>>,
    #[serde(borrow)]
    autonomous_system_number: Option<Field<'a>>,
    #[serde(borrow)]
    autonomous_system_organization: Option<Field<'a>>,
    #[serde(borrow)]
    asn: Option<Field<'a>>,
    #[serde(borrow)]
    as_name: Option<Field<'a>>,
    #[serde(borrow)]
    as_org: Option<Field<'a>>,
    #[serde(borrow)]
    as_domain: Option<Field<'a>>,
    #[serde(borrow)]
    organization: Option<Field<'a>>,
    #[serde(borrow)]
    isp: Option<Field<'a>>,
}

/// Two upper-case letters (a lower-case code is upper-cased).
fn country_code(f: Option<Field<'_>>) -> Option<String> {
    let (Field::Str(s) | Field::IsoCode(s)) = f? else {
        return None;
    };
    (s.len() == 2 && s.bytes().all(|b| b.is_ascii_alphabetic())).then(|| s.to_ascii_uppercase())
}

/// `15169` or `"AS15169"`.
fn asn_number(f: Option<Field<'_>>) -> Option<u32> {
    match f? {
        Field::Num(n) => u32::try_from(n).ok(),
        Field::Str(s) => {
            let digits = s
                .strip_prefix("AS")
                .or_else(|| s.strip_prefix("as"))
                .unwrap_or(s);
            digits.parse().ok()
        }
        Field::IsoCode(_) | Field::Other => None,
    }
}

fn text(f: Option<Field<'_>>) -> Option<&str> {
    match f? {
        Field::Str(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}

impl Record<'_> {
    fn country(&self) -> Option<String> {
        country_code(self.country)
            .or_else(|| country_code(self.country_code))
            .or_else(|| country_code(self.registered_country))
    }

    fn asn(&self) -> Option<(u32, String)> {
        let asn = asn_number(self.autonomous_system_number).or_else(|| asn_number(self.asn))?;
        let org = text(self.autonomous_system_organization)
            .or_else(|| text(self.as_name))
            .or_else(|| text(self.as_org))
            .or_else(|| text(self.organization))
            .or_else(|| text(self.isp))
            .or_else(|| text(self.as_domain))
            .unwrap_or_default();
        Some((asn, org.to_owned()))
    }
}

/// Whether the first records (in tree order) carry countries and ASNs: a database has one
/// schema, so a country database is not decoded again for ASNs, nor an ASN one for countries.
fn schema(reader: &maxminddb::Reader<Vec<u8>>) -> (bool, bool) {
    let Ok(networks) = reader.networks(maxminddb::WithinOptions::default()) else {
        return (true, true);
    };
    let (mut country, mut asn, mut seen) = (false, false, 0);
    for r in networks.take(SCHEMA_SAMPLE_RECORDS) {
        let Ok(Some(rec)) = r.and_then(|r| r.decode::<Record<'_>>()) else {
            continue;
        };
        seen += 1;
        country |= rec.country().is_some();
        asn |= rec.asn().is_some();
        if country && asn {
            break;
        }
    }
    if seen == 0 {
        (true, true)
    } else {
        (country, asn)
    }
}

impl Mmdb {
    /// Open a database from the file's bytes; `path` is for errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Mmdb, GeoError> {
        let reader = maxminddb::Reader::from_source(bytes).map_err(|source| GeoError::Mmdb {
            path: path.to_owned(),
            source,
        })?;
        let m = reader.metadata();
        let date = SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(m.build_epoch))
            .and_then(super::delegated::iso_date)
            .unwrap_or_else(|| "unknown".to_owned());
        let name = format!("mmdb:{}@{date}", m.database_type);
        let (has_country, has_asn) = schema(&reader);
        if !has_country && !has_asn {
            tracing::warn!(path = %path.display(), build = %name,
                "no sampled record has a country or an ASN: this database will answer nothing");
        }
        Ok(Mmdb {
            name,
            reader,
            has_country,
            has_asn,
        })
    }

    fn record(&self, ip: IpAddr) -> Option<Record<'_>> {
        if matches!(ip, IpAddr::V6(_)) && self.reader.metadata().ip_version == 4 {
            return None;
        }
        match self
            .reader
            .lookup(ip)
            .and_then(|r| r.decode::<Record<'_>>())
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(build = %self.name, %ip, error = %e, "mmdb record unreadable");
                None
            }
        }
    }
}

impl GeoSource for Mmdb {
    fn name(&self) -> &str {
        &self.name
    }

    fn country(&self, ip: IpAddr) -> Option<String> {
        if !self.has_country {
            return None;
        }
        self.record(ip)?.country()
    }

    fn asn(&self, ip: IpAddr) -> Option<(u32, String)> {
        if !self.has_asn {
            return None;
        }
        self.record(ip)?.asn()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::testutil::{MmdbWriter, Value};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// 2026-11-01T00:00:00Z.
    const EPOCH: u64 = 1_793_491_200;

    #[test]
    fn the_test_writer_produces_files_the_real_reader_accepts() {
        let mut w = MmdbWriter::new(6, "Test-Country", EPOCH);
        w.insert(
            ip("1.2.3.0"),
            24,
            Value::map([("country_code", Value::str("FR"))]),
        )
        .unwrap();
        w.insert(
            ip("2001:db8::"),
            32,
            Value::map([("n", Value::U32(70_000))]),
        )
        .unwrap();
        let bytes = w.to_bytes();
        let reader = maxminddb::Reader::from_source(bytes).unwrap();
        reader.verify().unwrap();
        let m = reader.metadata();
        assert_eq!((m.ip_version, m.record_size), (6, 24));
        assert_eq!(m.database_type, "Test-Country");
        assert_eq!(m.build_epoch, EPOCH);
        assert_eq!(m.languages, ["en"]);
        let r = reader.lookup(ip("1.2.3.4")).unwrap();
        assert_eq!(r.network().unwrap().to_string(), "1.2.3.0/24");
        let cc: Option<&str> = r
            .decode_path(&[maxminddb::PathElement::Key("country_code")])
            .unwrap();
        assert_eq!(cc, Some("FR"));
        let n: Option<u32> = reader
            .lookup(ip("2001:db8:1::1"))
            .unwrap()
            .decode_path(&[maxminddb::PathElement::Key("n")])
            .unwrap();
        assert_eq!(n, Some(70_000));
        assert!(!reader.lookup(ip("1.2.4.4")).unwrap().has_data());
    }

    #[test]
    fn a_geolite2_style_database_gives_country_iso_code() {
        let mut w = MmdbWriter::new(6, "GeoLite2-Country", EPOCH);
        let record = |cc: &str| {
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
                            Value::map([
                                ("en", Value::str("France")),
                                ("fr", Value::str("France")),
                            ]),
                        ),
                    ]),
                ),
                (
                    "registered_country",
                    Value::map([("iso_code", Value::str("DE"))]),
                ),
            ])
        };
        w.insert(ip("81.0.0.0"), 8, record("FR")).unwrap();
        w.insert(ip("2a01::"), 16, record("FR")).unwrap();
        w.insert(
            ip("82.0.0.0"),
            8,
            Value::map([(
                "registered_country",
                Value::map([("iso_code", Value::str("DE"))]),
            )]),
        )
        .unwrap();
        let db = Mmdb::from_bytes(Path::new("GeoLite2-Country.mmdb"), w.to_bytes()).unwrap();
        assert_eq!(db.name(), "mmdb:GeoLite2-Country@2026-11-01");
        assert_eq!(db.country(ip("81.1.2.3")).as_deref(), Some("FR"));
        assert_eq!(db.country(ip("2a01:e0a::1")).as_deref(), Some("FR"));
        // Only a registered country: that is the answer.
        assert_eq!(db.country(ip("82.1.2.3")).as_deref(), Some("DE"));
        assert_eq!(db.country(ip("83.1.2.3")), None);
        assert_eq!(db.asn(ip("81.1.2.3")), None);
    }

    #[test]
    fn a_flat_country_code_database_and_an_ipv4_only_tree_are_read() {
        let mut w = MmdbWriter::new(4, "ip-location-db-country", EPOCH);
        w.insert(
            ip("41.0.0.0"),
            8,
            Value::map([("country_code", Value::str("ma"))]),
        )
        .unwrap();
        w.insert(
            ip("41.1.0.0"),
            16,
            Value::map([("country_code", Value::str("ZA"))]),
        )
        .unwrap();
        let db = Mmdb::from_bytes(Path::new("x.mmdb"), w.to_bytes()).unwrap();
        assert_eq!(db.country(ip("41.0.0.1")).as_deref(), Some("MA"));
        assert_eq!(db.country(ip("41.1.0.1")).as_deref(), Some("ZA"));
        assert_eq!(db.country(ip("2001:db8::1")), None);
    }

    #[test]
    fn asn_databases_of_both_schemas_give_number_and_organisation() {
        let mut w = MmdbWriter::new(6, "GeoLite2-ASN", EPOCH);
        w.insert(
            ip("8.8.8.0"),
            24,
            Value::map([
                ("autonomous_system_number", Value::U32(15169)),
                ("autonomous_system_organization", Value::str("GOOGLE")),
            ]),
        )
        .unwrap();
        let db = Mmdb::from_bytes(Path::new("GeoLite2-ASN.mmdb"), w.to_bytes()).unwrap();
        assert_eq!(db.asn(ip("8.8.8.8")), Some((15169, "GOOGLE".to_owned())));
        assert_eq!(db.country(ip("8.8.8.8")), None);
        assert_eq!(db.asn(ip("8.8.9.8")), None);

        let mut w = MmdbWriter::new(6, "ipinfo lite.mmdb", EPOCH);
        w.insert(
            ip("1.1.1.0"),
            24,
            Value::map([
                ("asn", Value::str("AS13335")),
                ("as_name", Value::str("Cloudflare, Inc.")),
                ("as_domain", Value::str("cloudflare.com")),
                ("country", Value::str("Australia")),
                ("country_code", Value::str("AU")),
            ]),
        )
        .unwrap();
        w.insert(
            ip("9.9.9.0"),
            24,
            Value::map([("asn", Value::U32(19281)), ("as_org", Value::str("Quad9"))]),
        )
        .unwrap();
        let db = Mmdb::from_bytes(Path::new("ipinfo_lite.mmdb"), w.to_bytes()).unwrap();
        assert_eq!(
            db.asn(ip("1.1.1.1")),
            Some((13335, "Cloudflare, Inc.".to_owned()))
        );
        // A country name in `country` is not a code; `country_code` is.
        assert_eq!(db.country(ip("1.1.1.1")).as_deref(), Some("AU"));
        assert_eq!(db.asn(ip("9.9.9.9")), Some((19281, "Quad9".to_owned())));
    }

    #[test]
    fn a_file_with_the_marker_but_no_valid_metadata_is_an_mmdb_error() {
        let mut bytes = vec![0u8; 64];
        bytes.extend_from_slice(crate::geo::detect::MMDB_MARKER);
        bytes.push(0xe0);
        let e = Mmdb::from_bytes(Path::new("broken.mmdb"), bytes).unwrap_err();
        assert!(matches!(e, GeoError::Mmdb { .. }), "{e:?}");
        assert!(e.to_string().contains("broken.mmdb"), "{e}");
    }
}
