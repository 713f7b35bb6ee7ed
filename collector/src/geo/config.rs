//! `[geo]`: the geolocation databases and the operator's overrides.

use std::path::PathBuf;

use serde::Deserialize;

/// `[geo]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoConfig {
    /// Database files, each recognised by its content: MaxMind-format `.mmdb` (GeoLite2,
    /// DB-IP, IPinfo, ip-location-db; country or ASN), the registries' `delegated-*-extended`
    /// files (their `asn` records give the operator's country), RFC 8805 geofeeds
    /// (`prefix,country,region,city,postal`), or CSV ranges `start,end,country` /
    /// `start,end,asn,organisation`. Every file answers; the first answer (in this order,
    /// the embedded table last) is the verdict's country, and answers that disagree make it
    /// contested. Reloaded when a file changes.
    #[serde(default)]
    pub databases: Vec<PathBuf>,
    /// `[[geo.override]]`: CIDR blocks placed by the operator; they win over every database.
    #[serde(default, rename = "override")]
    pub overrides: Vec<GeoOverride>,
}

/// One `[[geo.override]]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
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
    /// ISO 3166-1 alpha-2 country where the block's operator is registered, when known.
    #[serde(default)]
    pub operator_country: Option<String>,
}
