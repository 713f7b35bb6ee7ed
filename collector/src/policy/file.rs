//! The policy file's schema and its validation.
//!
//! Value problems are all reported at once, each naming the field with its index
//! (`site[2].country`, `allow[0].reason`) and the bad value. Schema problems (TOML syntax, an
//! unknown key, a wrong type) stop parsing first, one at a time, as in every config here.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use sov_common::config::{Problems, check_country};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Policy;
use super::allow::{AllowEntry, AllowList, AllowTarget};
use super::datasets::DatasetRule;
use super::models::ModelRule;
use super::publishers::Publishers;

/// Default foreign egress (bytes per window) tolerated before it is a breach: 10 MiB.
pub const DEFAULT_FOREIGN_EGRESS_BYTES: u64 = 10 * 1024 * 1024;
/// Default window over which foreign egress is summed, seconds.
pub const DEFAULT_WINDOW_SECS: u64 = 300;
/// Default time without a report before a node counts as silent, seconds.
pub const DEFAULT_SILENCE_SECS: u64 = 300;
/// Default quiet period before a breach is resolved, seconds.
pub const DEFAULT_QUIET_SECS: u64 = 600;
/// Default fraction of restricted weights' size whose foreign egress counts as exfiltration.
pub const DEFAULT_EXFILTRATION_FRACTION: f64 = 0.1;
/// Default bytes per window to destinations with no known country before it is a breach: 10 MiB.
pub const DEFAULT_UNRESOLVED_BYTES: u64 = 10 * 1024 * 1024;
/// Accepted range of `window_secs`.
pub const WINDOW_SECS_RANGE: std::ops::RangeInclusive<u64> = 10..=86_400;
/// Smallest accepted `silence_secs`.
pub const MIN_SILENCE_SECS: u64 = 30;

/// The policy file (TOML) as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The country whose borders the policy defends, ISO 3166-1 alpha-2 (e.g. "MA"). Required.
    #[serde(default)]
    pub jurisdiction: String,
    /// Further countries treated as inside the jurisdiction. Default none.
    #[serde(default)]
    pub inside: Vec<String>,
    /// `[[site]]`: data centers and the country each is in; wins over what agents declare.
    #[serde(default, rename = "site")]
    pub sites: Vec<SiteConfig>,
    /// `[[model]]`: model classes; the first matching rule wins.
    #[serde(default, rename = "model")]
    pub models: Vec<ModelRuleConfig>,
    /// `[[dataset]]`: dataset classes (for the files training runs read); the first matching
    /// rule wins.
    #[serde(default, rename = "dataset")]
    pub datasets: Vec<DatasetRuleConfig>,
    /// `[[publisher]]`: publisher → origin country, extending or overriding the built-in table.
    #[serde(default, rename = "publisher")]
    pub publishers: Vec<PublisherConfig>,
    /// `[[allow]]`: foreign destinations that are not breaches.
    #[serde(default, rename = "allow")]
    pub allow: Vec<AllowConfig>,
    /// `[thresholds]`: when traffic or silence becomes a breach, and when a breach resolves.
    #[serde(default)]
    pub thresholds: Thresholds,
    /// `[verdicts]`: how contested and physically impossible verdicts count.
    #[serde(default)]
    pub verdicts: VerdictsConfig,
}

/// `[verdicts]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictsConfig {
    /// How a destination whose sources disagree counts: "strict" (any source placing it
    /// outside the jurisdiction makes it outside), or "source:PREFIX" (the answer of the first
    /// source whose build starts with PREFIX, e.g. "source:geofeed" or
    /// "source:mmdb:GeoLite2-Country"; when that source has no answer, strict). Default "strict".
    #[serde(default = "default_contested")]
    pub contested: String,
    /// How a database verdict the speed-of-light check rules out counts: "review" (not foreign;
    /// shown for review, and the `impossible-verdict` rule opens a warning), or "foreign" (as its
    /// country says). Operator overrides are never checked. Default "review".
    #[serde(default = "default_impossible")]
    pub impossible: String,
}

impl Default for VerdictsConfig {
    fn default() -> Self {
        Self {
            contested: default_contested(),
            impossible: default_impossible(),
        }
    }
}

fn default_contested() -> String {
    "strict".to_owned()
}
fn default_impossible() -> String {
    "review".to_owned()
}

/// One `[[site]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Site name, as agents declare it in `[node] site`. Required, unique.
    #[serde(default)]
    pub name: String,
    /// ISO 3166-1 alpha-2 country the site is in. Required.
    #[serde(default)]
    pub country: String,
    /// Latitude of the site, degrees (-90..=90), for the speed-of-light check of verdicts.
    /// Default none: the whole country is taken as the site's place (the check then only
    /// rules out countries farther than the RTT allows from every point of it).
    #[serde(default)]
    pub latitude: Option<f64>,
    /// Longitude of the site, degrees (-180..=180); given together with `latitude`.
    #[serde(default)]
    pub longitude: Option<f64>,
}

/// One `[[model]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRuleConfig {
    /// `sha256:<hex>`, `publisher:<glob>`, `ollama:<name:tag glob>`, `gguf:<name glob>`,
    /// `repo:<glob>`, or a bare repository-id glob such as "meta-llama/*". Required.
    #[serde(default, rename = "match")]
    pub pattern: String,
    /// "restricted" or "public". Required.
    #[serde(default)]
    pub class: String,
}

/// One `[[dataset]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRuleConfig {
    /// `sha256:<hex>`, `path:<glob>` (or a bare glob starting with "/"), `name:<file-name
    /// glob>`, `repo:<glob>` or a bare Hugging Face dataset-id glob such as "gov-ma/*". Required.
    #[serde(default, rename = "match")]
    pub pattern: String,
    /// "restricted" or "public". Required.
    #[serde(default)]
    pub class: String,
}

/// One `[[publisher]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublisherConfig {
    /// Publisher or organisation name as it appears in repository ids (case-insensitive). Required.
    #[serde(default)]
    pub name: String,
    /// ISO 3166-1 alpha-2 country of origin. Required.
    #[serde(default)]
    pub country: String,
}

/// One `[[allow]]`: at most one of `cidr`, `asn`, `country`, optionally scoped to a
/// Kubernetes `namespace` or a container `image` (at least a destination or a scope), with a
/// reason.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowConfig {
    /// Block, e.g. "203.0.113.0/24" or "2001:db8::/32".
    #[serde(default)]
    pub cidr: Option<String>,
    /// Autonomous system number.
    #[serde(default)]
    pub asn: Option<u32>,
    /// ISO 3166-1 alpha-2 country.
    #[serde(default)]
    pub country: Option<String>,
    /// Only traffic from pods in a Kubernetes namespace matching this glob (e.g. "backup",
    /// "team-*"); host processes never match. Default: any traffic.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Only traffic from containers whose image reference matches this glob (e.g.
    /// "registry.example/mirror/*"); host processes never match. Default: any traffic.
    #[serde(default)]
    pub image: Option<String>,
    /// Why this destination is allowed (auditors read it). Required.
    #[serde(default)]
    pub reason: String,
    /// RFC 3339 time after which the entry allows nothing, quoted or as a TOML date-time
    /// with an offset. Default: never.
    #[serde(default)]
    pub expires: Option<toml::Value>,
}

/// `[thresholds]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Bytes sent outside the jurisdiction per window (per node) before it is a breach. Default 10 MiB.
    #[serde(default = "default_foreign_egress_bytes")]
    pub foreign_egress_bytes: u64,
    /// Window over which egress is summed, seconds, 10..=86400. Default 300.
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Time without a report before a node is silent, seconds, at least 30. Default 300.
    #[serde(default = "default_silence_secs")]
    pub silence_secs: u64,
    /// Time a breach's condition must stay absent before it resolves, seconds. Default 600.
    #[serde(default = "default_quiet_secs")]
    pub quiet_secs: u64,
    /// Fraction of a restricted model's weight size sent abroad that counts as exfiltration,
    /// in (0, 1]. Default 0.1.
    #[serde(default = "default_exfiltration_fraction")]
    pub exfiltration_fraction: f64,
    /// Bytes per window to destinations with no known country before it is a breach. Default 10 MiB.
    #[serde(default = "default_unresolved_bytes")]
    pub unresolved_bytes: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            foreign_egress_bytes: DEFAULT_FOREIGN_EGRESS_BYTES,
            window_secs: DEFAULT_WINDOW_SECS,
            silence_secs: DEFAULT_SILENCE_SECS,
            quiet_secs: DEFAULT_QUIET_SECS,
            exfiltration_fraction: DEFAULT_EXFILTRATION_FRACTION,
            unresolved_bytes: DEFAULT_UNRESOLVED_BYTES,
        }
    }
}

fn default_foreign_egress_bytes() -> u64 {
    DEFAULT_FOREIGN_EGRESS_BYTES
}
fn default_window_secs() -> u64 {
    DEFAULT_WINDOW_SECS
}
fn default_silence_secs() -> u64 {
    DEFAULT_SILENCE_SECS
}
fn default_quiet_secs() -> u64 {
    DEFAULT_QUIET_SECS
}
fn default_exfiltration_fraction() -> f64 {
    DEFAULT_EXFILTRATION_FRACTION
}
fn default_unresolved_bytes() -> u64 {
    DEFAULT_UNRESOLVED_BYTES
}

impl Thresholds {
    fn validate(&self, p: &mut Problems) {
        if !WINDOW_SECS_RANGE.contains(&self.window_secs) {
            p.push(
                "thresholds.window_secs",
                format!(
                    "{} is out of range {}..={}",
                    self.window_secs,
                    WINDOW_SECS_RANGE.start(),
                    WINDOW_SECS_RANGE.end()
                ),
            );
        }
        if self.silence_secs < MIN_SILENCE_SECS {
            p.push(
                "thresholds.silence_secs",
                format!("{} is under {MIN_SILENCE_SECS}", self.silence_secs),
            );
        }
        let f = self.exfiltration_fraction;
        if !(f > 0.0 && f <= 1.0) {
            p.push(
                "thresholds.exfiltration_fraction",
                format!("{f} is out of range (0, 1]"),
            );
        }
    }
}

/// Parse an RFC 3339 `expires` value into Unix milliseconds.
fn parse_expires(value: &toml::Value) -> Result<(String, i64), String> {
    let text = match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Datetime(d) => d.to_string(),
        other => return Err(format!("{other} is not an RFC 3339 time")),
    };
    let at = OffsetDateTime::parse(text.trim(), &Rfc3339).map_err(|_| {
        format!("{text:?} is not an RFC 3339 time with an offset, e.g. \"2027-01-31T00:00:00Z\"")
    })?;
    let ms = i64::try_from(at.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("{text:?} is out of range"))?;
    Ok((text, ms))
}

impl PolicyConfig {
    /// Check every value and build the policy, or list every problem. `now_unix_ms` decides
    /// which `expires` have already passed (a warning, not an error).
    pub fn build(self, now_unix_ms: i64) -> Result<Policy, Problems> {
        let mut p = Problems::default();
        let mut warnings = Vec::new();

        if self.jurisdiction.is_empty() {
            p.push(
                "jurisdiction",
                "is required: the ISO 3166-1 alpha-2 country the policy defends, e.g. \"MA\"",
            );
        } else {
            check_country(&mut p, "jurisdiction", &self.jurisdiction);
        }
        let mut inside = BTreeSet::new();
        inside.insert(self.jurisdiction.clone());
        for (i, c) in self.inside.iter().enumerate() {
            check_country(&mut p, &format!("inside[{i}]"), c);
            inside.insert(c.clone());
        }

        let mut sites: BTreeMap<String, String> = BTreeMap::new();
        let mut site_points: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        let mut site_index: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, s) in self.sites.iter().enumerate() {
            if s.name.trim().is_empty() {
                p.push(&format!("site[{i}].name"), "is required");
            } else if let Some(first) = site_index.get(s.name.as_str()) {
                p.push(
                    &format!("site[{i}].name"),
                    format!("{:?} is listed twice (also site[{first}])", s.name),
                );
            } else {
                site_index.insert(&s.name, i);
            }
            check_country(&mut p, &format!("site[{i}].country"), &s.country);
            match (s.latitude, s.longitude) {
                (None, None) => {}
                (Some(lat), Some(lon)) => {
                    if !(-90.0..=90.0).contains(&lat) {
                        p.push(
                            &format!("site[{i}].latitude"),
                            format!("{lat} is out of range -90..=90"),
                        );
                    } else if !(-180.0..=180.0).contains(&lon) {
                        p.push(
                            &format!("site[{i}].longitude"),
                            format!("{lon} is out of range -180..=180"),
                        );
                    } else {
                        site_points.entry(s.name.clone()).or_insert((lat, lon));
                    }
                }
                (Some(_), None) => p.push(
                    &format!("site[{i}].longitude"),
                    "is required with latitude (both or neither)",
                ),
                (None, Some(_)) => p.push(
                    &format!("site[{i}].latitude"),
                    "is required with longitude (both or neither)",
                ),
            }
            sites
                .entry(s.name.clone())
                .or_insert_with(|| s.country.clone());
        }

        let mut models = Vec::with_capacity(self.models.len());
        for (i, m) in self.models.iter().enumerate() {
            match ModelRule::parse(i, &m.pattern, &m.class) {
                Ok(rule) => models.push(rule),
                Err(problems) => {
                    for (field, message) in problems {
                        p.push(&format!("model[{i}].{field}"), message);
                    }
                }
            }
        }

        let mut datasets = Vec::with_capacity(self.datasets.len());
        for (i, d) in self.datasets.iter().enumerate() {
            match DatasetRule::parse(i, &d.pattern, &d.class) {
                Ok(rule) => datasets.push(rule),
                Err(problems) => {
                    for (field, message) in problems {
                        p.push(&format!("dataset[{i}].{field}"), message);
                    }
                }
            }
        }

        let mut publishers = Publishers::default();
        let mut publisher_index: BTreeMap<String, usize> = BTreeMap::new();
        for (i, pb) in self.publishers.iter().enumerate() {
            let key = pb.name.trim().to_ascii_lowercase();
            if key.is_empty() {
                p.push(&format!("publisher[{i}].name"), "is required");
            } else if key.contains('/') {
                p.push(
                    &format!("publisher[{i}].name"),
                    format!(
                        "{:?} is a repository id; name the organisation before the \"/\"",
                        pb.name
                    ),
                );
            } else if let Some(first) = publisher_index.get(&key) {
                p.push(
                    &format!("publisher[{i}].name"),
                    format!("{:?} is listed twice (also publisher[{first}])", pb.name),
                );
            } else {
                publisher_index.insert(key, i);
            }
            check_country(&mut p, &format!("publisher[{i}].country"), &pb.country);
            publishers.insert(&pb.name, &pb.country);
        }

        let mut allow = Vec::with_capacity(self.allow.len());
        for (i, a) in self.allow.iter().enumerate() {
            let field = |f: &str| format!("allow[{i}].{f}");
            let given: Vec<&str> = [
                a.cidr.as_ref().map(|_| "cidr"),
                a.asn.as_ref().map(|_| "asn"),
                a.country.as_ref().map(|_| "country"),
            ]
            .into_iter()
            .flatten()
            .collect();
            let mut target = None;
            let mut scope_ok = true;
            for (name, glob) in [("namespace", &a.namespace), ("image", &a.image)] {
                if glob.as_deref().is_some_and(|g| g.trim().is_empty()) {
                    p.push(
                        &field(name),
                        "is empty: give a glob, or leave it out to allow any traffic",
                    );
                    scope_ok = false;
                }
            }
            let scoped = a.namespace.is_some() || a.image.is_some();
            match given.as_slice() {
                [] if scoped => target = Some(AllowTarget::Any),
                [] => p.push(
                    &format!("allow[{i}]"),
                    "names no destination: give exactly one of cidr, asn or country (or a namespace or image scope)",
                ),
                [_] => {}
                several => p.push(
                    &format!("allow[{i}]"),
                    format!(
                        "names several destinations ({}): give exactly one of cidr, asn or country",
                        several.join(", ")
                    ),
                ),
            }
            if let Some(cidr) = &a.cidr {
                match AllowTarget::cidr(cidr) {
                    Ok(t) => target = Some(t),
                    Err(e) => p.push(&field("cidr"), format!("{cidr:?}: {e}")),
                }
            }
            if let Some(asn) = a.asn {
                if asn == 0 {
                    p.push(&field("asn"), "0 is not an autonomous system number");
                } else {
                    target = Some(AllowTarget::Asn(asn));
                }
            }
            if let Some(country) = &a.country {
                let before = p.0.len();
                check_country(&mut p, &field("country"), country);
                if p.0.len() == before {
                    target = Some(AllowTarget::Country(country.clone()));
                }
            }
            if a.reason.trim().is_empty() {
                p.push(
                    &field("reason"),
                    "is required: say why this destination is allowed (auditors read it)",
                );
            }
            let mut expires = None;
            if let Some(value) = &a.expires {
                match parse_expires(value) {
                    Ok((text, ms)) => {
                        if ms <= now_unix_ms {
                            warnings.push(format!(
                                "{}: {text} has passed; this entry allows nothing",
                                field("expires")
                            ));
                        }
                        expires = Some((text, ms));
                    }
                    Err(e) => p.push(&field("expires"), e),
                }
            }
            if let (Some(target), 0 | 1, true) = (target, given.len(), scope_ok) {
                let (expires_text, expires_unix_ms) = expires.unzip();
                allow.push(AllowEntry {
                    index: i,
                    target,
                    reason: a.reason.clone(),
                    expires: expires_text,
                    expires_unix_ms,
                    namespace: a.namespace.as_ref().map(|g| g.trim().to_owned()),
                    image: a.image.as_ref().map(|g| g.trim().to_owned()),
                });
            }
        }

        self.thresholds.validate(&mut p);
        let verdicts = match super::verdicts::VerdictRules::parse(&self.verdicts) {
            Ok(v) => v,
            Err(problems) => {
                for (field, message) in problems {
                    p.push(&format!("verdicts.{field}"), message);
                }
                super::verdicts::VerdictRules::default()
            }
        };

        if !p.is_empty() {
            return Err(p);
        }
        Ok(Policy {
            jurisdiction: self.jurisdiction,
            inside,
            sites,
            site_points,
            thresholds: self.thresholds,
            verdicts,
            models,
            datasets,
            publishers,
            allow: AllowList::new(allow),
            warnings,
        })
    }
}
