//! The jurisdiction policy: which countries are inside, where sites are, which models are
//! restricted, where each publisher comes from, which foreign destinations are allowed, and
//! the thresholds the rules use.
//!
//! Parts:
//! - [`file`](mod@file): the TOML schema ([`PolicyConfig`], [`Thresholds`]) and its validation;
//! - [`models`]: `[[model]]` rules and [`ModelClass`] matching;
//! - [`datasets`]: `[[dataset]]` rules, the class of the dataset files training runs read;
//! - [`publishers`]: publisher → origin country, built-in defaults plus `[[publisher]]`;
//! - [`allow`]: the `[[allow]]` list ([`AllowVerdict`]);
//! - [`watch`]: [`PolicyWatch`], which reloads the file when it changes;
//! - [`rules`]: the breach rules, one file each, and their evaluation;
//! - [`evaluator`]: the loop that evaluates the rules under the replicas' rules lease.
//!
//! `sov-collector policy check FILE` validates a file. The rules engine that opens and
//! resolves breaches reads a [`Policy`] through these calls.

pub mod allow;
pub mod datasets;
pub mod evaluator;
pub mod file;
pub mod models;
pub mod publishers;
pub mod rules;
pub mod verdicts;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use sov_common::clock::now_unix_ms;
use sov_common::config::Problems;

pub use allow::{AllowEntry, AllowTarget, AllowVerdict, Workload};
pub use datasets::{DatasetFacts, DatasetRule};
pub use evaluator::{Evaluator, POLICY_RELOAD_EVERY};
pub use file::{PolicyConfig, Thresholds, VerdictsConfig};
pub use models::{ModelClass, ModelFacts, ModelPlaces, ModelRule};
pub use verdicts::{Counted, VerdictRules};
pub use watch::PolicyWatch;

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for the schema (syntax, unknown key, wrong type).
    #[error("policy {path} is not valid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said, with line and column.
        message: String,
    },
    /// The values are wrong; every problem is listed.
    #[error("policy {path} is invalid:\n{problems}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem, each naming the field and the bad value.
        problems: Problems,
    },
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The country whose borders the policy defends (ISO 3166-1 alpha-2).
    pub jurisdiction: String,
    /// Countries inside the jurisdiction: `jurisdiction` plus `inside`.
    pub inside: BTreeSet<String>,
    /// Site → country, from `[[site]]`.
    pub sites: BTreeMap<String, String>,
    /// Site → (latitude, longitude), for the sites whose `[[site]]` gives them.
    pub site_points: BTreeMap<String, (f64, f64)>,
    /// `[thresholds]`.
    pub thresholds: Thresholds,
    /// `[verdicts]`: how contested and physically impossible verdicts count.
    pub verdicts: VerdictRules,
    models: Vec<ModelRule>,
    datasets: Vec<DatasetRule>,
    publishers: publishers::Publishers,
    allow: allow::AllowList,
    warnings: Vec<String>,
}

impl Policy {
    /// Read and validate a policy file, reporting every problem at once.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Validate policy text; `origin` names it in errors (usually the file's path).
    pub fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        Self::parse_at(text, origin, now_unix_ms())
    }

    /// [`Policy::parse`] with the time that decides which `expires` have passed.
    pub fn parse_at(text: &str, origin: &str, now_unix_ms: i64) -> Result<Policy, PolicyError> {
        let cfg: PolicyConfig = toml::from_str(text).map_err(|e| PolicyError::Parse {
            path: PathBuf::from(origin),
            message: e.to_string(),
        })?;
        cfg.build(now_unix_ms)
            .map_err(|problems| PolicyError::Invalid {
                path: PathBuf::from(origin),
                problems,
            })
    }

    /// What is suspicious but valid (e.g. an `[[allow]]` whose `expires` has passed), each
    /// naming the field.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// True when `country` (ISO 3166-1 alpha-2, any case) is inside the jurisdiction; an
    /// unknown ("") country is not.
    pub fn is_inside(&self, country: &str) -> bool {
        !country.is_empty()
            && (self.inside.contains(country)
                || self.inside.contains(&country.to_ascii_uppercase()))
    }

    /// A node's country: its site's country from the policy when the site is listed (the
    /// policy wins over what the agent declares), else the declared one.
    pub fn node_country(&self, site: &str, declared: &str) -> String {
        self.sites
            .get(site)
            .cloned()
            .unwrap_or_else(|| declared.to_owned())
    }

    /// Where a node is for the speed-of-light check: its site's coordinates when `[[site]]`
    /// gives them, else its country (the site's, else the declared one); `None` when unknown.
    pub fn place(&self, site: &str, declared: &str) -> Option<crate::geo::physics::Place> {
        if let Some((lat, lon)) = self.site_points.get(site) {
            return Some(crate::geo::physics::Place::Point {
                lat: *lat,
                lon: *lon,
            });
        }
        let country = self.node_country(site, declared);
        (!country.is_empty()).then_some(crate::geo::physics::Place::Country(country))
    }

    /// How an egress row's destination counts under this policy ([`verdicts`]).
    pub fn count(&self, row: &sov_proto::pb::EgressRow) -> Counted {
        self.verdicts.count(row, |c| self.is_inside(c))
    }

    /// The model's class and the index of the `[[model]]` rule that decided it (the first
    /// matching one); `(Unclassified, None)` when none matches.
    pub fn model_class(&self, m: &ModelFacts<'_>) -> (ModelClass, Option<usize>) {
        self.models
            .iter()
            .find(|r| r.matches(m))
            .map_or((ModelClass::Unclassified, None), |r| {
                (r.class, Some(r.index))
            })
    }

    /// The `[[model]]` rules in file order (`model_class`'s index is a position here).
    pub fn model_rules(&self) -> &[ModelRule] {
        &self.models
    }

    /// A dataset file's class and the index of the `[[dataset]]` rule that decided it (the
    /// first matching one); `(Unclassified, None)` when none matches.
    pub fn dataset_class(&self, d: &DatasetFacts<'_>) -> (ModelClass, Option<usize>) {
        self.datasets
            .iter()
            .find(|r| r.matches(d))
            .map_or((ModelClass::Unclassified, None), |r| {
                (r.class, Some(r.index))
            })
    }

    /// The `[[dataset]]` rules in file order.
    pub fn dataset_rules(&self) -> &[DatasetRule] {
        &self.datasets
    }

    /// Origin country of a publisher or of a repository id's organisation (`org/name` →
    /// `org`): the policy's `[[publisher]]` first, then the built-in defaults.
    pub fn publisher_country(&self, publisher_or_repo: &str) -> Option<String> {
        self.publishers.country(publisher_or_repo)
    }

    /// Whether a foreign destination is allowed, and by which `[[allow]]` entry: the most
    /// specific active one (CIDR, then ASN, then country); expired entries allow nothing.
    pub fn allowed(
        &self,
        ip: IpAddr,
        asn: Option<u32>,
        country: &str,
        now_unix_ms: i64,
    ) -> Option<AllowVerdict> {
        self.allow.allowed(ip, asn, country, now_unix_ms)
    }

    /// [`Policy::allowed`] for traffic from a workload (its Kubernetes namespace and image):
    /// entries scoped to a namespace or image allow only traffic from there.
    pub fn allowed_from(
        &self,
        ip: IpAddr,
        asn: Option<u32>,
        country: &str,
        from: &Workload<'_>,
        now_unix_ms: i64,
    ) -> Option<AllowVerdict> {
        self.allow.allowed_from(ip, asn, country, from, now_unix_ms)
    }

    /// The `[[allow]]` entries in file order.
    pub fn allow_entries(&self) -> Vec<&AllowEntry> {
        self.allow.entries()
    }

    /// The policy as JSON, for admins (`GetPolicy`, `GET /api/v1/policy`): jurisdiction,
    /// inside countries, sites, model rules, allowed destinations (each with its reason,
    /// expiry and whether it is active at `now_unix_ms`), thresholds, warnings.
    pub fn to_json(&self, now_unix_ms: i64) -> serde_json::Value {
        let allow: Vec<serde_json::Value> = self
            .allow
            .entries()
            .into_iter()
            .map(|e| {
                let target = match &e.target {
                    AllowTarget::Cidr { net, len } => {
                        serde_json::json!({"cidr": format!("{net}/{len}")})
                    }
                    AllowTarget::Asn(asn) => serde_json::json!({"asn": asn}),
                    AllowTarget::Country(c) => serde_json::json!({"country": c}),
                    AllowTarget::Any => serde_json::json!({"any": true}),
                };
                serde_json::json!({
                    "target": target,
                    "namespace": e.namespace,
                    "image": e.image,
                    "reason": e.reason,
                    "expires": e.expires,
                    "active": e.is_active(now_unix_ms),
                })
            })
            .collect();
        let models: Vec<serde_json::Value> = self
            .models
            .iter()
            .map(|r| serde_json::json!({"match": r.pattern, "class": r.class.as_str()}))
            .collect();
        let datasets: Vec<serde_json::Value> = self
            .datasets
            .iter()
            .map(|r| serde_json::json!({"match": r.pattern, "class": r.class.as_str()}))
            .collect();
        let t = &self.thresholds;
        serde_json::json!({
            "jurisdiction": self.jurisdiction,
            "inside": self.inside,
            "sites": self.sites,
            "models": models,
            "datasets": datasets,
            "allow": allow,
            "site_coordinates": self.site_points.iter().map(|(k, (lat, lon))| (k.clone(), serde_json::json!({"latitude": lat, "longitude": lon}))).collect::<serde_json::Map<String, serde_json::Value>>(),
            "verdicts": self.verdicts.to_json(),
            "thresholds": {
                "foreign_egress_bytes": t.foreign_egress_bytes,
                "window_secs": t.window_secs,
                "silence_secs": t.silence_secs,
                "quiet_secs": t.quiet_secs,
                "exfiltration_fraction": t.exfiltration_fraction,
                "unresolved_bytes": t.unresolved_bytes,
            },
            "warnings": self.warnings,
        })
    }

    /// One line for `policy check`: counts of sites, model rules, dataset rules and allow
    /// entries.
    pub fn summary(&self) -> String {
        format!(
            "{} sites, {} model rules, {} dataset rules, {} allow entries",
            self.sites.len(),
            self.models.len(),
            self.datasets.len(),
            self.allow.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000; // 2027-01-15

    fn parse(text: &str) -> Policy {
        Policy::parse_at(text, "test.toml", NOW).unwrap()
    }

    #[test]
    fn the_policy_as_json_shows_sites_models_allow_entries_with_their_state_and_thresholds() {
        let p = parse(
            "jurisdiction = \"MA\"\ninside = [\"TN\"]\n[[site]]\nname = \"paris\"\ncountry = \"FR\"\n[[model]]\nmatch = \"acme/*\"\nclass = \"restricted\"\n[[allow]]\ncidr = \"198.51.100.0/24\"\nreason = \"backup\"\nexpires = \"2027-01-20T00:00:00Z\"\n[[allow]]\nasn = 64500\nreason = \"cdn\"\n[thresholds]\nwindow_secs = 60\n",
        );
        let v = p.to_json(NOW);
        assert_eq!(v["jurisdiction"], "MA");
        assert_eq!(v["inside"], serde_json::json!(["MA", "TN"]));
        assert_eq!(v["sites"]["paris"], "FR");
        assert_eq!(
            v["models"][0],
            serde_json::json!({"match": "acme/*", "class": "restricted"})
        );
        let allow = v["allow"].as_array().unwrap();
        assert_eq!(allow.len(), 2);
        let cidr = allow
            .iter()
            .find(|a| a["target"]["cidr"].is_string())
            .unwrap();
        assert_eq!(cidr["target"]["cidr"], "198.51.100.0/24");
        assert_eq!(cidr["active"], true);
        // Five days later the entry has expired.
        let later = p.to_json(NOW + 5 * 86_400_000);
        let cidr = later["allow"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["target"]["cidr"].is_string())
            .unwrap()
            .clone();
        assert_eq!(cidr["active"], false);
        assert_eq!(v["thresholds"]["window_secs"], 60);
    }

    fn problems(text: &str) -> String {
        match Policy::parse_at(text, "test.toml", NOW) {
            Err(e @ PolicyError::Invalid { .. }) => e.to_string(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn a_minimal_policy_gets_documented_defaults() {
        let p = parse("jurisdiction = \"MA\"\n");
        assert_eq!(p.inside, BTreeSet::from(["MA".to_owned()]));
        assert_eq!(p.thresholds, Thresholds::default());
        assert_eq!(p.thresholds.foreign_egress_bytes, 10 * 1024 * 1024);
        assert_eq!(p.thresholds.window_secs, 300);
        assert_eq!(p.thresholds.silence_secs, 300);
        assert_eq!(p.thresholds.quiet_secs, 600);
        assert_eq!(p.thresholds.exfiltration_fraction, 0.1);
        assert_eq!(p.thresholds.unresolved_bytes, 10 * 1024 * 1024);
        assert!(p.warnings().is_empty());
        assert_eq!(
            p.summary(),
            "0 sites, 0 model rules, 0 dataset rules, 0 allow entries"
        );
    }

    #[test]
    fn the_example_policy_in_deploy_is_valid_without_warnings() {
        let p = Policy::parse(include_str!("../../../deploy/policy.toml"), "deploy").unwrap();
        assert!(p.warnings().is_empty(), "{:?}", p.warnings());
        assert!(!p.sites.is_empty() && !p.model_rules().is_empty());
        assert!(!p.allow_entries().is_empty());
    }

    #[test]
    fn inside_countries_include_the_jurisdiction() {
        let p = parse("jurisdiction = \"MA\"\ninside = [\"SN\"]\n");
        assert!(p.is_inside("MA") && p.is_inside("SN") && p.is_inside("ma"));
        assert!(!p.is_inside("FR"));
        assert!(!p.is_inside(""));
    }

    #[test]
    fn a_listed_site_s_country_wins_over_the_declared_one() {
        let p = parse("jurisdiction = \"MA\"\n[[site]]\nname = \"casa-1\"\ncountry = \"MA\"\n");
        assert_eq!(p.node_country("casa-1", "FR"), "MA");
        assert_eq!(p.node_country("paris-1", "FR"), "FR");
        assert_eq!(p.node_country("paris-1", ""), "");
    }

    #[test]
    fn the_first_matching_model_rule_wins() {
        let p = parse(
            "jurisdiction = \"MA\"\n\
             [[model]]\nmatch = \"meta-llama/Llama-3.1-8B\"\nclass = \"public\"\n\
             [[model]]\nmatch = \"meta-llama/*\"\nclass = \"restricted\"\n\
             [[model]]\nmatch = \"publisher:meta-llama\"\nclass = \"public\"\n",
        );
        let class = |model: &str, publisher: &str| {
            p.model_class(&ModelFacts {
                model,
                sha256: "",
                publisher,
                ..ModelFacts::default()
            })
        };
        assert_eq!(
            class("meta-llama/Llama-3.1-8B", ""),
            (ModelClass::Public, Some(0))
        );
        assert_eq!(
            class("meta-llama/Llama-3.1-70B", ""),
            (ModelClass::Restricted, Some(1))
        );
        assert_eq!(
            class("Meta Llama 3.1 8B", "meta-llama"),
            (ModelClass::Public, Some(2))
        );
        assert_eq!(class("llama3:8b", ""), (ModelClass::Unclassified, None));
        assert_eq!(p.model_rules()[1].pattern, "meta-llama/*");
    }

    #[test]
    fn publisher_entries_extend_and_override_the_defaults() {
        let p = parse(
            "jurisdiction = \"MA\"\n\
             [[publisher]]\nname = \"Qwen\"\ncountry = \"SG\"\n\
             [[publisher]]\nname = \"atlas-lab\"\ncountry = \"MA\"\n",
        );
        assert_eq!(
            p.publisher_country("Qwen/Qwen2.5-7B").as_deref(),
            Some("SG")
        );
        assert_eq!(p.publisher_country("atlas-lab").as_deref(), Some("MA"));
        assert_eq!(
            p.publisher_country("mistralai/Mistral-7B").as_deref(),
            Some("FR")
        );
        assert_eq!(p.publisher_country("someone/else"), None);
    }

    #[test]
    fn allow_entries_answer_with_their_reason_and_expire() {
        let p = parse(
            "jurisdiction = \"MA\"\n\
             [[allow]]\ncountry = \"FR\"\nreason = \"DR site\"\nexpires = 2027-02-01T00:00:00Z\n\
             [[allow]]\ncidr = \"192.0.2.0/24\"\nreason = \"partner\"\nexpires = \"2027-01-20T00:00:00+01:00\"\n\
             [[allow]]\nasn = 64500\nreason = \"transit\"\n",
        );
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let v = p.allowed(ip, Some(64500), "FR", NOW).unwrap();
        assert_eq!((v.entry, v.reason.as_str()), (1, "partner"));
        let jan_21 = NOW + 6 * 86_400_000;
        assert_eq!(p.allowed(ip, Some(64500), "FR", jan_21).unwrap().entry, 2);
        assert_eq!(p.allowed(ip, None, "FR", jan_21).unwrap().entry, 0);
        let feb_2 = NOW + 18 * 86_400_000;
        assert_eq!(p.allowed(ip, None, "FR", feb_2), None);
        assert_eq!(
            p.allow_entries()[1].expires.as_deref(),
            Some("2027-01-20T00:00:00+01:00")
        );
    }

    #[test]
    fn an_expired_allow_entry_is_a_warning_not_an_error() {
        let p = parse(
            "jurisdiction = \"MA\"\n[[allow]]\ncountry = \"FR\"\nreason = \"old\"\nexpires = \"2020-01-01T00:00:00Z\"\n",
        );
        assert_eq!(p.warnings().len(), 1);
        assert!(p.warnings()[0].starts_with("allow[0].expires: 2020-01-01T00:00:00Z"));
        assert_eq!(p.allowed("1.1.1.1".parse().unwrap(), None, "FR", NOW), None);
    }

    #[test]
    fn every_value_problem_is_reported_at_once_naming_field_and_value() {
        let all = problems(
            "jurisdiction = \"Morocco\"\ninside = [\"SN\", \"sn\"]\n\
             [[site]]\nname = \"casa-1\"\ncountry = \"MA\"\n\
             [[site]]\nname = \"casa-1\"\ncountry = \"XYZ\"\n\
             [[model]]\nmatch = \"\"\nclass = \"public\"\n\
             [[model]]\nmatch = \"hf:meta-llama/*\"\nclass = \"secret\"\n\
             [[publisher]]\nname = \"acme\"\ncountry = \"usa\"\n\
             [[allow]]\nreason = \"nothing\"\n\
             [[allow]]\ncidr = \"10.0.0.0/8\"\nasn = 1\nreason = \"two\"\n\
             [[allow]]\ncidr = \"10.0.0.0/33\"\nreason = \"\"\n\
             [[allow]]\ncountry = \"FR\"\nreason = \"x\"\nexpires = \"tomorrow\"\n\
             [[allow]]\nasn = 0\nreason = \"zero\"\nexpires = 2027-01-01\n\
             [[allow]]\nnamespace = \" \"\nreason = \"blank scope\"\n\
             [thresholds]\nwindow_secs = 5\nsilence_secs = 10\nexfiltration_fraction = 1.5\n",
        );
        for needle in [
            "jurisdiction: \"Morocco\"",
            "inside[1]: \"sn\"",
            "site[1].name: \"casa-1\" is listed twice (also site[0])",
            "site[1].country: \"XYZ\"",
            "model[0].match: is empty",
            "model[1].match: \"hf:meta-llama/*\"",
            "model[1].class: \"secret\"",
            "publisher[0].country: \"usa\"",
            "allow[0]: names no destination",
            "allow[1]: names several destinations (cidr, asn)",
            "allow[2].cidr: \"10.0.0.0/33\"",
            "allow[2].reason: is required",
            "allow[3].expires: \"tomorrow\"",
            "allow[4].asn: 0",
            "allow[4].expires: \"2027-01-01\"",
            "allow[5].namespace: is empty",
            "thresholds.window_secs: 5",
            "thresholds.silence_secs: 10",
            "thresholds.exfiltration_fraction: 1.5",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in\n{all}");
        }
        assert!(all.starts_with("policy test.toml is invalid:"), "{all}");
        assert!(problems("").contains("jurisdiction: is required"));
        assert!(
            problems("jurisdiction = \"MA\"\n[thresholds]\nexfiltration_fraction = 0.0\n")
                .contains("exfiltration_fraction")
        );
    }

    #[test]
    fn unknown_keys_and_bad_toml_are_parse_errors_with_their_position() {
        for (text, needle) in [
            (
                "jurisdiction = \"MA\"\njurisdicton = \"MA\"\n",
                "jurisdicton",
            ),
            (
                "jurisdiction = \"MA\"\n[[allow]]\ncountry = \"FR\"\nreasons = \"x\"\n",
                "reasons",
            ),
            (
                "jurisdiction = \"MA\"\n[thresholds]\nwindow = 3\n",
                "window",
            ),
            (
                "jurisdiction = \"MA\"\n[[model]]\npattern = \"x\"\n",
                "pattern",
            ),
            ("jurisdiction = MA\n", "line 1"),
        ] {
            match Policy::parse_at(text, "p.toml", NOW) {
                Err(e @ PolicyError::Parse { .. }) => {
                    let s = e.to_string();
                    assert!(s.contains(needle) && s.contains("p.toml"), "{s}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn load_names_a_missing_file() {
        let e = Policy::load(Path::new("/no/such/policy.toml")).unwrap_err();
        assert!(matches!(e, PolicyError::Read { .. }));
        assert!(e.to_string().contains("/no/such/policy.toml"));
    }
}
