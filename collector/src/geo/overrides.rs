//! `[[geo.override]]`: CIDR blocks placed by the operator, which win over every database.
//!
//! A block is `address/prefix` (IPv4 or IPv6; a bare address is a single host). Host bits
//! are accepted and masked off (`10.1.2.3/8` is `10.0.0.0/8`). IPv4-mapped IPv6 blocks
//! (`::ffff:10.0.0.0/104`) are stored as IPv4, since lookups are normalised. The longest
//! matching prefix wins; two entries for the same block are refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::GeoOverride;
use super::{GeoError, GeoSource, SourceKind};

/// One parsed override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideEntry {
    /// Network bits (IPv4 in the low 32 bits), host bits zero.
    net: u128,
    /// Prefix length, up to 32 for IPv4 and 128 for IPv6.
    len: u8,
    v4: bool,
    /// Position in `[[geo.override]]`.
    index: usize,
    /// `override:<canonical block>`, the verdict's source.
    pub source: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
    /// Autonomous system number, when given.
    pub asn: Option<u32>,
    /// Organisation, when given.
    pub org: Option<String>,
    /// Country where the operator is registered, when given.
    pub operator_country: Option<String>,
}

impl OverrideEntry {
    fn contains(&self, ip: IpAddr) -> bool {
        let (bits, width) = match ip {
            IpAddr::V4(v4) if self.v4 => (u128::from(v4.to_bits()), 32),
            IpAddr::V6(v6) if !self.v4 => (v6.to_bits(), 128),
            _ => return false,
        };
        bits & mask(self.len, width) == self.net
    }
}

/// The network mask of a `len`-bit prefix of a `width`-bit address.
fn mask(len: u8, width: u32) -> u128 {
    let all = u128::MAX >> (128 - width);
    let host = all.checked_shr(u32::from(len)).unwrap_or(0);
    all & !host
}

/// Parse `address/prefix` by hand: the network (host bits masked off) and the prefix length.
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let text = text.trim();
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 or IPv6 address"))?;
    let width: u8 = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => width,
        Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => {
            let n: u8 = l
                .parse()
                .map_err(|_| format!("prefix length {l:?} is not a number"))?;
            if n > width {
                return Err(format!("prefix length {n} is over {width}"));
            }
            n
        }
        Some(l) => return Err(format!("prefix length {l:?} is not a number")),
    };
    let net = match ip {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from_bits(
            (u128::from(v4.to_bits()) & mask(len, 32)) as u32,
        )),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask(len, 128))),
    };
    Ok((net, len))
}

/// The overrides, longest prefix first.
#[derive(Debug, Default)]
pub struct Overrides {
    entries: Vec<OverrideEntry>,
}

/// Build string of the overrides in [`super::Geo::builds`].
pub const OVERRIDES_BUILD: &str = "override:config";

impl Overrides {
    /// Parse every entry; the first bad one is the error.
    pub fn from_config(cfg: &[GeoOverride]) -> Result<Overrides, GeoError> {
        match Self::parse_all(cfg) {
            Ok(o) => Ok(o),
            Err(mut problems) => Err(problems.remove(0)),
        }
    }

    /// Every bad entry.
    pub fn problems(cfg: &[GeoOverride]) -> Vec<GeoError> {
        Self::parse_all(cfg).err().unwrap_or_default()
    }

    fn parse_all(cfg: &[GeoOverride]) -> Result<Overrides, Vec<GeoError>> {
        let mut entries: Vec<OverrideEntry> = Vec::with_capacity(cfg.len());
        let mut problems = Vec::new();
        for (index, o) in cfg.iter().enumerate() {
            let bad = |message: String| GeoError::Override {
                index,
                cidr: o.cidr.clone(),
                message,
            };
            let mut messages = Vec::new();
            let parsed = parse_cidr(&o.cidr).map_err(|m| messages.push(m)).ok();
            if o.country.len() != 2 || !o.country.bytes().all(|b| b.is_ascii_uppercase()) {
                messages.push(format!(
                    "country {:?} is not an ISO 3166-1 alpha-2 code (two upper-case letters, e.g. \"MA\")",
                    o.country
                ));
            }
            if let Some(c) = &o.operator_country
                && (c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()))
            {
                messages.push(format!(
                    "operator_country {c:?} is not an ISO 3166-1 alpha-2 code (two upper-case letters, e.g. \"US\")"
                ));
            }
            if let Some((net, len)) = parsed {
                let (net, len) = match net {
                    IpAddr::V6(v6) if len >= 96 && v6.to_ipv4_mapped().is_some() => (
                        IpAddr::V4(Ipv4Addr::from_bits(v6.to_bits() as u32)),
                        len - 96,
                    ),
                    _ => (net, len),
                };
                let (bits, v4) = match net {
                    IpAddr::V4(v4) => (u128::from(v4.to_bits()), true),
                    IpAddr::V6(v6) => (v6.to_bits(), false),
                };
                if let Some(e) = entries
                    .iter()
                    .find(|e| e.net == bits && e.len == len && e.v4 == v4)
                {
                    messages.push(format!(
                        "the same block {net}/{len} as geo.override[{}]",
                        e.index
                    ));
                }
                if messages.is_empty() {
                    entries.push(OverrideEntry {
                        net: bits,
                        len,
                        v4,
                        index,
                        source: format!("override:{net}/{len}"),
                        country: o.country.clone(),
                        asn: o.asn,
                        org: o.org.clone(),
                        operator_country: o.operator_country.clone(),
                    });
                }
            }
            problems.extend(messages.into_iter().map(bad));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        // Longest prefix first; stable, so config order breaks no ties (blocks are unique).
        entries.sort_by_key(|e| std::cmp::Reverse(e.len));
        Ok(Overrides { entries })
    }

    /// The most specific override holding `ip` (already normalised).
    pub fn find(&self, ip: IpAddr) -> Option<&OverrideEntry> {
        self.entries.iter().find(|e| e.contains(ip))
    }

    /// True when there is no override.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl GeoSource for Overrides {
    fn name(&self) -> &str {
        OVERRIDES_BUILD
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Override
    }

    fn country(&self, ip: IpAddr) -> Option<String> {
        self.find(ip).map(|e| e.country.clone())
    }

    fn asn(&self, ip: IpAddr) -> Option<(u32, String)> {
        let e = self.find(ip)?;
        Some((e.asn?, e.org.clone().unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn entry(cidr: &str, country: &str) -> GeoOverride {
        GeoOverride {
            cidr: cidr.to_owned(),
            country: country.to_owned(),
            asn: None,
            org: None,
            operator_country: None,
        }
    }

    #[test]
    fn cidrs_are_parsed_by_hand_and_host_bits_masked() {
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap(), (ip("10.0.0.0"), 8));
        assert_eq!(
            parse_cidr("2001:db8::1/32").unwrap(),
            (ip("2001:db8::"), 32)
        );
        assert_eq!(parse_cidr("192.0.2.7").unwrap(), (ip("192.0.2.7"), 32));
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap(), (ip("0.0.0.0"), 0));
        assert_eq!(parse_cidr("::/0").unwrap(), (ip("::"), 0));
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/8/8",
            "x/8",
            "",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn the_longest_matching_prefix_wins_among_overrides() {
        let o = Overrides::from_config(&[
            entry("10.0.0.0/8", "FR"),
            entry("10.1.0.0/16", "DE"),
            entry("10.1.2.0/24", "NL"),
            entry("2001:db8::/32", "BE"),
            entry("::ffff:192.168.0.0/112", "MA"),
        ])
        .unwrap();
        assert_eq!(o.country(ip("10.9.9.9")).as_deref(), Some("FR"));
        assert_eq!(o.country(ip("10.1.9.9")).as_deref(), Some("DE"));
        assert_eq!(o.country(ip("10.1.2.9")).as_deref(), Some("NL"));
        assert_eq!(
            o.find(ip("10.1.2.9")).unwrap().source,
            "override:10.1.2.0/24"
        );
        assert_eq!(o.country(ip("11.0.0.1")), None);
        assert_eq!(o.country(ip("2001:db8::1")).as_deref(), Some("BE"));
        assert_eq!(o.country(ip("2001:db9::1")), None);
        // Stored as IPv4 192.168.0.0/16.
        assert_eq!(o.country(ip("192.168.3.4")).as_deref(), Some("MA"));
        assert_eq!(
            o.country(ip("::ffff:10.9.9.9")),
            None,
            "lookups are normalised before"
        );
    }

    #[test]
    fn a_bad_override_is_an_error_naming_the_entry() {
        let cfg = [
            entry("10.0.0.0/8", "FR"),
            entry("10.0.0.0/33", "FR"),
            entry("192.168.0.0/16", "fr"),
            entry("10.9.0.0/8", "DE"),
        ];
        let e = Overrides::from_config(&cfg).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("geo.override[1]") && text.contains("10.0.0.0/33"),
            "{text}"
        );
        let all: Vec<String> = Overrides::problems(&cfg)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(
            all[1].contains("geo.override[2]") && all[1].contains("\"fr\""),
            "{all:?}"
        );
        assert!(
            all[2].contains("geo.override[3]") && all[2].contains("geo.override[0]"),
            "{all:?}"
        );
        assert!(Overrides::problems(&cfg[..1]).is_empty());
    }
}
