//! The embedded default table: the `iptocc` crate, built from the five registries'
//! delegated files, so that a fresh install geolocates offline. Countries only, no ASNs.

use std::net::IpAddr;

use super::{GeoSource, SourceKind};

/// Build string of the embedded table: the `iptocc` version (its data is that release's).
/// A test checks it against `Cargo.lock`.
pub const EMBEDDED_BUILD: &str = "embedded:iptocc-1.4.175";

/// The `iptocc` table.
#[derive(Debug, Clone, Copy, Default)]
pub struct Embedded;

impl GeoSource for Embedded {
    fn name(&self) -> &str {
        EMBEDDED_BUILD
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Registry
    }

    fn country(&self, ip: IpAddr) -> Option<String> {
        iptocc::country_code(ip)
            .filter(|cc| cc.len() == 2 && cc.bytes().all(|b| b.is_ascii_uppercase()) && *cc != "ZZ")
            .map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn well_known_public_addresses_resolve_to_their_country() {
        assert_eq!(Embedded.country(ip("8.8.8.8")).as_deref(), Some("US"));
        assert_eq!(Embedded.country(ip("193.0.6.139")).as_deref(), Some("NL"));
        let v6 = Embedded.country(ip("2001:4860:4860::8888")).unwrap();
        assert_eq!(v6, "US");
    }

    #[test]
    fn private_and_special_addresses_are_unknown() {
        for a in [
            "10.1.2.3",
            "192.168.1.1",
            "127.0.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
        ] {
            assert_eq!(Embedded.country(ip(a)), None, "{a}");
        }
    }

    #[test]
    fn the_build_string_names_the_iptocc_version_in_cargo_lock() {
        let lock = include_str!("../../../Cargo.lock");
        let version = lock
            .split("[[package]]")
            .find(|p| p.contains("name = \"iptocc\""))
            .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap();
        assert_eq!(EMBEDDED_BUILD, format!("embedded:iptocc-{version}"));
    }
}
