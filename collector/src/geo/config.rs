//! `[geo]`: the geolocation databases and the operator's overrides.

use std::path::PathBuf;

use serde::Deserialize;

/// `[geo]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoConfig {
    /// Database files, each recognised by its content: MaxMind-format `.mmdb` (GeoLite2,
    /// DB-IP, IPinfo, ip-location-db; country or ASN), the registries' `delegated-*-extended`
    /// files, or CSV ranges `start,end,country` / `start,end,asn,organisation`. Earlier files
    /// win; the embedded table answers last. Reloaded when a file changes.
    #[serde(default)]
    pub databases: Vec<PathBuf>,
    /// `[[geo.override]]`: CIDR blocks placed by the operator; they win over every database.
    #[serde(default, rename = "override")]
    pub overrides: Vec<GeoOverride>,
}

/// One `[[geo.override]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GeoOverride {
    /// Block, e.g. "10.0.0.0/8" or "2001:db8::/32".
    pub cidr: String,
    /// ISO 3166-1 alpha-2 country the block is in.
    pub country: String,
    /// Autonomous system number, when known.
    #[serde(default)]
    pub asn: Option<u32>,
    /// Organisation, when known.
    #[serde(default)]
    pub org: Option<String>,
}
