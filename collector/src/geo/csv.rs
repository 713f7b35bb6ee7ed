//! CSV range files, recognised by their columns:
//! - country ranges `start,end,CC[,…]` (ip-location-db `*-country`, DB-IP lite CSV,
//!   IP2Location LITE DB1 with its country name after the code);
//! - ASN ranges `start,end,asn,organisation` (ip-location-db `asn`, iptoasn; the ASN may be
//!   written `AS13335`, the organisation quoted with commas inside).
//!
//! Addresses are written as text (`1.0.0.0`, `2001:db8::`) or as decimal integers. An
//! optional header line is skipped; `#` comments and blank lines too. Rows with country
//! `-`/`ZZ`/empty or ASN 0 mean "not assigned" and are skipped.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use super::ranges::{RangeBuilder, RangeTable};
use super::{GeoError, GeoSource};

/// The fields of one CSV line: comma-separated, a field in double quotes may hold commas and
/// `""` for a quote; unquoted fields are trimmed.
pub fn split_fields(line: &str) -> Vec<Cow<'_, str>> {
    let mut out = Vec::new();
    let mut rest = line;
    loop {
        let trimmed = rest.trim_start();
        if let Some(quoted) = trimmed.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut after = "";
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if quoted[i + 1..].starts_with('"') {
                        value.push('"');
                        chars.next();
                    } else {
                        after = &quoted[i + 1..];
                        break;
                    }
                } else {
                    value.push(c);
                }
            }
            out.push(Cow::Owned(value));
            // Anything between the closing quote and the next comma is ignored.
            match after.find(',') {
                Some(i) => rest = &after[i + 1..],
                None => return out,
            }
        } else {
            match rest.find(',') {
                Some(i) => {
                    out.push(Cow::Borrowed(rest[..i].trim()));
                    rest = &rest[i + 1..];
                }
                None => {
                    out.push(Cow::Borrowed(rest.trim()));
                    return out;
                }
            }
        }
    }
}

/// An address as text, or as a decimal integer (IPv4 when it fits 32 bits).
pub fn parse_address(field: &str) -> Option<IpAddr> {
    if let Ok(ip) = field.parse::<IpAddr>() {
        return Some(ip);
    }
    let n = parse_integer(field)?;
    Some(match u32::try_from(n) {
        Ok(v4) => IpAddr::V4(Ipv4Addr::from_bits(v4)),
        Err(_) => IpAddr::V6(Ipv6Addr::from_bits(n)),
    })
}

fn parse_integer(field: &str) -> Option<u128> {
    if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

/// `start,end` as a range: as integers, both ends are IPv6 when the end needs more than
/// 32 bits (IP2Location's IPv6 files start at 0).
fn parse_range(start: &str, end: &str) -> Option<(IpAddr, IpAddr)> {
    if let (Some(s), Some(e)) = (parse_integer(start), parse_integer(end))
        && e > u128::from(u32::MAX)
    {
        return Some((
            IpAddr::V6(Ipv6Addr::from_bits(s)),
            IpAddr::V6(Ipv6Addr::from_bits(e)),
        ));
    }
    Some((parse_address(start)?, parse_address(end)?))
}

/// `13335` or `AS13335`.
fn parse_asn(field: &str) -> Option<u32> {
    let digits = field
        .strip_prefix("AS")
        .or_else(|| field.strip_prefix("as"))
        .unwrap_or(field);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The organisation column: the fourth field, or the rest of the line when an unquoted
/// organisation holds commas.
fn organisation(line: &str, fields: &[Cow<'_, str>]) -> String {
    match fields.get(3) {
        None => String::new(),
        Some(f) if fields.len() == 4 => f.to_string(),
        Some(f) => match line.splitn(4, ',').nth(3).map(str::trim) {
            Some(rest) if !rest.starts_with('"') => rest.to_owned(),
            _ => f.to_string(),
        },
    }
}

/// What the rows of a CSV file give.
enum Table {
    Country(RangeTable<String>),
    Asn(RangeTable<(u32, String)>),
}

/// A CSV range file.
pub struct Csv {
    name: String,
    table: Table,
}

impl std::fmt::Debug for Csv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, (v4, v6)) = match &self.table {
            Table::Country(t) => ("country", t.counts()),
            Table::Asn(t) => ("asn", t.counts()),
        };
        f.debug_struct("Csv")
            .field("name", &self.name)
            .field("kind", &kind)
            .field("v4_ranges", &v4)
            .field("v6_ranges", &v6)
            .finish()
    }
}

impl Csv {
    /// Parse a CSV file's content; `path` names the source (`csv:<file name>`) and errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Csv, GeoError> {
        let err = |line: usize, message: String| GeoError::Parse {
            path: path.to_owned(),
            line,
            message,
        };
        let text =
            std::str::from_utf8(bytes).map_err(|e| err(0, format!("not UTF-8 text: {e}")))?;
        let mut countries: RangeBuilder<String> = RangeBuilder::new();
        let mut asns: RangeBuilder<(u32, String)> = RangeBuilder::new();
        let mut is_asn: Option<bool> = None;
        let mut seen_data = false;
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields = split_fields(line);
            let range = match fields.as_slice() {
                [s, e, _, ..] => parse_range(s, e),
                _ => None,
            };
            let Some((start, end)) = range else {
                if !seen_data {
                    // A header line.
                    seen_data = true;
                    continue;
                }
                return Err(err(
                    line_no,
                    "expected start,end,country or start,end,asn,organisation".to_owned(),
                ));
            };
            seen_data = true;
            let third = fields[2].as_ref();
            let asn_row = *is_asn.get_or_insert_with(|| parse_asn(third).is_some());
            if asn_row {
                let asn = parse_asn(third)
                    .ok_or_else(|| err(line_no, format!("ASN {third:?} is not a number")))?;
                if asn == 0 {
                    continue;
                }
                let org = organisation(line, &fields);
                asns.push(start, end, (asn, org))
            } else {
                let cc = third.to_ascii_uppercase();
                if cc.is_empty() || cc == "-" || cc == "ZZ" {
                    continue;
                }
                if cc.len() != 2 || !cc.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(err(
                        line_no,
                        format!("country {third:?} is not an ISO 3166-1 alpha-2 code"),
                    ));
                }
                countries.push(start, end, cc)
            }
            .map_err(|m| err(line_no, m))?;
        }
        let name = format!(
            "csv:{}",
            path.file_name()
                .map_or_else(|| path.to_string_lossy(), |n| n.to_string_lossy())
        );
        let (table, overlaps) = if is_asn == Some(true) {
            if asns.is_empty() {
                return Err(err(0, "no ASN ranges".to_owned()));
            }
            let (t, o) = asns.build();
            (Table::Asn(t), o)
        } else {
            if countries.is_empty() {
                return Err(err(0, "no country ranges".to_owned()));
            }
            let (t, o) = countries.build();
            (Table::Country(t), o)
        };
        if overlaps > 0 {
            tracing::debug!(path = %path.display(), overlaps, "overlapping ranges: the narrower wins");
        }
        Ok(Csv { name, table })
    }
}

impl GeoSource for Csv {
    fn name(&self) -> &str {
        &self.name
    }

    fn country(&self, ip: IpAddr) -> Option<String> {
        match &self.table {
            Table::Country(t) => t.get(ip).cloned(),
            Table::Asn(_) => None,
        }
    }

    fn asn(&self, ip: IpAddr) -> Option<(u32, String)> {
        match &self.table {
            Table::Asn(t) => t.get(ip).cloned(),
            Table::Country(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn fields_are_split_on_commas_outside_quotes() {
        let f = split_fields(r#"1.0.0.0, 1.0.0.255 ,13335,"Cloudflare, Inc. ""CF""" ,x"#);
        assert_eq!(
            f,
            [
                "1.0.0.0",
                "1.0.0.255",
                "13335",
                "Cloudflare, Inc. \"CF\"",
                "x"
            ]
        );
        assert_eq!(split_fields("a,,b,"), ["a", "", "b", ""]);
    }

    #[test]
    fn csv_country_ranges_answer_countries_and_nothing_outside() {
        let text = "ip_range_start,ip_range_end,country_code\n\
                    1.0.0.0,1.0.0.255,AU\n\
                    # comment\n\
                    \n\
                    1.0.1.0,1.0.3.255,cn\n\
                    1.0.4.0,1.0.4.255,-\n\
                    2001:db8::,2001:db8:ffff:ffff:ffff:ffff:ffff:ffff,FR\n";
        let c = Csv::parse(Path::new("/data/dbip-country.csv"), text.as_bytes()).unwrap();
        assert_eq!(c.name(), "csv:dbip-country.csv");
        assert_eq!(c.country(ip("1.0.0.1")).as_deref(), Some("AU"));
        assert_eq!(c.country(ip("1.0.2.1")).as_deref(), Some("CN"));
        assert_eq!(c.country(ip("1.0.4.1")), None);
        assert_eq!(c.country(ip("2001:db8::5")).as_deref(), Some("FR"));
        assert_eq!(c.country(ip("9.9.9.9")), None);
        assert_eq!(c.asn(ip("1.0.0.1")), None);
    }

    #[test]
    fn csv_asn_ranges_keep_an_organisation_with_a_comma_in_quotes() {
        let text = "1.0.0.0,1.0.0.255,13335,\"Cloudflare, Inc.\"\n\
                    8.8.8.0,8.8.8.255,AS15169,Google LLC\n\
                    9.0.0.0,9.0.0.255,0,Not routed\n\
                    10.0.0.0,10.0.0.255,64500,Acme, unquoted\n";
        let c = Csv::parse(Path::new("asn.csv"), text.as_bytes()).unwrap();
        assert_eq!(
            c.asn(ip("1.0.0.9")),
            Some((13335, "Cloudflare, Inc.".to_owned()))
        );
        assert_eq!(c.asn(ip("8.8.8.8")), Some((15169, "Google LLC".to_owned())));
        assert_eq!(c.asn(ip("9.0.0.1")), None);
        assert_eq!(
            c.asn(ip("10.0.0.1")),
            Some((64500, "Acme, unquoted".to_owned()))
        );
        assert_eq!(c.country(ip("8.8.8.8")), None);
    }

    #[test]
    fn integer_addresses_are_read_as_ipv4_or_ipv6() {
        let text = "\"16777216\",\"16777471\",\"AU\",\"Australia\"\n\
                    \"0\",\"281470681743359\",\"-\",\"-\"\n\
                    \"281470698520576\",\"281470698520831\",\"AU\",\"Australia\"\n\
                    \"42540766411282592856903984951653826560\",\"42540766490510755371168322545197776895\",\"US\",\"United States\"\n";
        let c = Csv::parse(Path::new("IP2LOCATION-LITE-DB1.CSV"), text.as_bytes()).unwrap();
        assert_eq!(c.country(ip("1.0.0.1")).as_deref(), Some("AU"));
        // ::ffff:1.0.0.0/120 stored as IPv4.
        assert_eq!(c.country(ip("1.0.0.200")).as_deref(), Some("AU"));
        assert_eq!(c.country(ip("2001:db8::1")).as_deref(), Some("US"));
    }

    #[test]
    fn a_bad_row_is_refused_with_its_line_number() {
        let text = "1.0.0.0,1.0.0.255,AU\n1.0.1.0,1.0.1.255,Australia\n";
        let e = Csv::parse(Path::new("x.csv"), text.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("x.csv:2:"), "{e}");
        let e = Csv::parse(Path::new("x.csv"), b"1.0.0.0,1.0.0.255,AU\nnonsense\n").unwrap_err();
        assert!(e.to_string().contains("x.csv:2:"), "{e}");
        let e = Csv::parse(Path::new("x.csv"), b"1.0.0.9,1.0.0.1,AU\n").unwrap_err();
        assert!(e.to_string().contains("before its start"), "{e}");
    }
}
