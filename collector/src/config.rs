//! The collector's TOML configuration: strict, documented defaults, every problem at once.
//!
//! [`CollectorConfig`] is the file's root; each `[section]` is declared by the part it
//! configures (`[geo]` in [`crate::geo`], `[alert]` in [`crate::alert`], `[tls]` in
//! [`crate::tls`], ...) and re-exported here, so that no part imports this module: the root
//! sits above every section, and its [`CollectorConfig::validate`] asks each part to check its
//! own section.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sov_common::config::{ConfigError, Problems, check_readable, read_toml};

pub use crate::alert::{
    AlertConfig, AlertmanagerSinkConfig, SlackSinkConfig, SyslogSinkConfig, WebhookSinkConfig,
};
pub use crate::derive::DeriveConfig;
pub use crate::enroll::{DEFAULT_ENROLL_VALIDITY_SECS, EnrollConfig};
pub use crate::geo::{GeoConfig, GeoOverride};
pub use crate::metrics::MetricsConfig;
pub use crate::query::http::HttpConfig;
pub use crate::store::StoreConfig;
pub use crate::tls::{DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS, ServerTlsFiles};

/// Default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// Default data directory (database).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sov-collector";
/// Default largest accepted report, encoded bytes.
pub const DEFAULT_MAX_REPORT_BYTES: usize = 16 * 1024 * 1024;
/// Default cap on one page of a query.
pub const DEFAULT_MAX_PAGE: u32 = 1000;
/// Default retention of time series (host, GPU samples) and report bodies, days.
pub const DEFAULT_RETENTION_DAYS: u32 = 30;
/// Default retention of minute aggregates, days.
pub const DEFAULT_AGGREGATE_RETENTION_DAYS: u32 = 365;
/// Default retention of flow minutes (and container identity per minute), days: see
/// docs/ARCHITECTURE.md, "Day rows and shorter-lived minutes".
pub const DEFAULT_MINUTE_RETENTION_DAYS: u32 = 8;
/// Default retention of hour rows, days.
pub const DEFAULT_HOUR_RETENTION_DAYS: u32 = 90;
/// Default most gRPC connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// `sov-collector serve` configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Address the gRPC server listens on. Default "0.0.0.0:7443".
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory holding the embedded database. Default "/var/lib/sov-collector".
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Largest report accepted, in encoded bytes; larger ones get RESOURCE_EXHAUSTED. Default 16 MiB.
    #[serde(default = "default_max_report_bytes")]
    pub max_report_bytes: usize,
    /// Largest page any query returns. Default 1000.
    #[serde(default = "default_max_page")]
    pub max_page: u32,
    /// Days of host/GPU time series and report bodies kept; report keys and completeness
    /// counters are kept forever. Default 30.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Days of minute aggregates kept (flows per minute, and host, GPU and GPU-usage minutes
    /// folded from raw samples before they go). Default 365; at least `retention_days`.
    #[serde(default = "default_aggregate_retention_days")]
    pub aggregate_retention_days: u32,
    /// Days of flow minutes (per destination) and per-minute container identity kept; the
    /// questions that need the destination address or the container read only these. Older
    /// ranges are answered from hour and day rows. Default 8; at most `hour_retention_days`
    /// (a value above `aggregate_retention_days` acts as `aggregate_retention_days`).
    #[serde(default = "default_minute_retention_days")]
    pub minute_retention_days: u32,
    /// Days of hour rows (`flows_hour`, `gpu_usage_hour`) kept; day rows are kept
    /// `aggregate_retention_days`. Default 90; at least `minute_retention_days`.
    #[serde(default = "default_hour_retention_days")]
    pub hour_retention_days: u32,
    /// Flow minutes and GPU usage older than this are rolled up, every minute, into hour rows
    /// (the current hour's row grows as minutes are added), and whole hours into day rows,
    /// which the questions over long ranges read (the minutes stay for their retention).
    /// Hours, 0..=720; 0 (the default) rolls up every minute older than two minutes.
    #[serde(default = "default_rollup_after_hours")]
    pub rollup_after_hours: u32,
    /// Most gRPC connections open at once, handshaking or established; more are closed as
    /// soon as they are accepted. Keep it under the process's open-file limit. Default 4096.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest a TLS handshake may take before the connection is dropped (connections that
    /// never send, or send a byte at a time), seconds, 1..=300. Default 10.
    #[serde(default = "default_tls_handshake_timeout_secs")]
    pub tls_handshake_timeout_secs: u64,
    /// Seconds between two signed checkpoints of the breach log's and the audit log's heads
    /// (signed with the collector's key when a head moved; also at start and at shutdown),
    /// 1..=86400. Records after the last checkpoint are covered by the hash chain only.
    /// Default 60.
    #[serde(default = "default_checkpoint_interval_secs")]
    pub checkpoint_interval_secs: u64,
    /// SPIFFE trust domain of client certificates (`spiffe://<trust_domain>/<role>/<name>`). Default "sovereign".
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Server certificate, key, and the CA that signs client certificates.
    pub tls: ServerTlsFiles,
    /// `[geo]`: where remote addresses are placed.
    #[serde(default)]
    pub geo: GeoConfig,
    /// `[store]`: where reports are stored.
    #[serde(default)]
    pub store: StoreConfig,
    /// `[metrics]`: the Prometheus endpoint (off by default).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[alert]`: where breach alerts are sent (no sink by default).
    #[serde(default)]
    pub alert: AlertConfig,
    /// `[derive]`: how acknowledged reports are derived (batch size, the queries' wait).
    #[serde(default)]
    pub derive: DeriveConfig,
    /// `[http]`: the HTTPS JSON API and the web page (off by default).
    #[serde(default)]
    pub http: HttpConfig,
    /// `[enroll]`: nodes enroll with one-time tokens and renew their certificates (off unless
    /// `ca_key` is set).
    #[serde(default)]
    pub enroll: EnrollConfig,
    /// `[limits]`: what one client may hold (connections per address, reports in flight).
    #[serde(default)]
    pub limits: crate::tls::limits::LimitsConfig,
    /// Policy file (jurisdiction, thresholds, `[[allow]]`, ...). When set, the collector
    /// evaluates the built-in breach rules against it every few seconds and reloads it when it
    /// changes; the file must load at start. Default: none (no breach rules run).
    #[serde(default)]
    pub policy: Option<PathBuf>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7443))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}
fn default_max_report_bytes() -> usize {
    DEFAULT_MAX_REPORT_BYTES
}
fn default_max_page() -> u32 {
    DEFAULT_MAX_PAGE
}
fn default_rollup_after_hours() -> u32 {
    crate::store::rollup::DEFAULT_ROLLUP_AFTER_HOURS
}

fn default_retention_days() -> u32 {
    DEFAULT_RETENTION_DAYS
}
fn default_aggregate_retention_days() -> u32 {
    DEFAULT_AGGREGATE_RETENTION_DAYS
}
fn default_minute_retention_days() -> u32 {
    DEFAULT_MINUTE_RETENTION_DAYS
}
fn default_hour_retention_days() -> u32 {
    DEFAULT_HOUR_RETENTION_DAYS
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_tls_handshake_timeout_secs() -> u64 {
    DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS
}
fn default_checkpoint_interval_secs() -> u64 {
    crate::checkpoint::DEFAULT_CHECKPOINT_INTERVAL_SECS
}
fn default_trust_domain() -> String {
    crate::auth::DEFAULT_TRUST_DOMAIN.to_owned()
}

impl CollectorConfig {
    /// A configuration with defaults around the given essentials (used by the dev mode and tests).
    pub fn new(listen: SocketAddr, data_dir: PathBuf, tls: ServerTlsFiles) -> Self {
        Self {
            listen,
            data_dir,
            max_report_bytes: DEFAULT_MAX_REPORT_BYTES,
            max_page: DEFAULT_MAX_PAGE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            tls_handshake_timeout_secs: DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS,
            checkpoint_interval_secs: crate::checkpoint::DEFAULT_CHECKPOINT_INTERVAL_SECS,
            retention_days: DEFAULT_RETENTION_DAYS,
            aggregate_retention_days: DEFAULT_AGGREGATE_RETENTION_DAYS,
            minute_retention_days: DEFAULT_MINUTE_RETENTION_DAYS,
            hour_retention_days: DEFAULT_HOUR_RETENTION_DAYS,
            rollup_after_hours: default_rollup_after_hours(),
            trust_domain: default_trust_domain(),
            tls,
            geo: GeoConfig::default(),
            store: StoreConfig::default(),
            metrics: MetricsConfig::default(),
            alert: AlertConfig::default(),
            derive: DeriveConfig::default(),
            http: HttpConfig::default(),
            enroll: EnrollConfig::default(),
            limits: crate::tls::limits::LimitsConfig::default(),
            policy: None,
        }
    }

    /// Load and validate a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = read_toml(path)?;
        cfg.validate().into_result()?;
        Ok(cfg)
    }

    /// [`CollectorConfig::load`] for serving: also the private keys the collector holds
    /// (`tls.key`, `enroll.ca_key`) must be readable by their owner only, as ssh requires of
    /// its keys; with `allow_insecure_keys` such a key is a warning (logged) instead.
    pub fn load_for_serving(path: &Path, allow_insecure_keys: bool) -> Result<Self, ConfigError> {
        let cfg: Self = read_toml(path)?;
        let mut problems = cfg.validate();
        let mut keys = cfg.key_problems();
        if allow_insecure_keys {
            for k in &keys.0 {
                tracing::warn!(problem = %k, "insecure private key allowed by --allow-insecure-keys");
            }
            keys.0.clear();
        }
        problems.0.extend(keys.0);
        problems.into_result()?;
        Ok(cfg)
    }

    /// The private keys readable by group or others.
    pub fn key_problems(&self) -> Problems {
        let mut p = Problems::default();
        sov_common::config::check_private_key(&mut p, "tls.key", &self.tls.key);
        if let Some(k) = &self.enroll.ca_key {
            sov_common::config::check_private_key(&mut p, "enroll.ca_key", k);
        }
        p
    }

    /// Every problem in the configuration.
    pub fn validate(&self) -> Problems {
        let mut p = Problems::default();
        if !(1024..=256 * 1024 * 1024).contains(&self.max_report_bytes) {
            p.push(
                "max_report_bytes",
                format!("{} is out of range 1024..=268435456", self.max_report_bytes),
            );
        }
        if !(1..=100_000).contains(&self.max_page) {
            p.push(
                "max_page",
                format!("{} is out of range 1..=100000", self.max_page),
            );
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            p.push(
                "max_connections",
                format!("{} is out of range 1..=1000000", self.max_connections),
            );
        }
        if !(1..=300).contains(&self.tls_handshake_timeout_secs) {
            p.push(
                "tls_handshake_timeout_secs",
                format!(
                    "{} is out of range 1..=300",
                    self.tls_handshake_timeout_secs
                ),
            );
        }
        if !(1..=86_400).contains(&self.checkpoint_interval_secs) {
            p.push(
                "checkpoint_interval_secs",
                format!(
                    "{} is out of range 1..=86400",
                    self.checkpoint_interval_secs
                ),
            );
        }
        if !(1..=3650).contains(&self.retention_days) {
            p.push(
                "retention_days",
                format!("{} is out of range 1..=3650", self.retention_days),
            );
        }
        if !(self.retention_days.max(1)..=3650).contains(&self.aggregate_retention_days) {
            p.push(
                "aggregate_retention_days",
                format!(
                    "{} is out of range retention_days ({})..=3650",
                    self.aggregate_retention_days, self.retention_days
                ),
            );
        }
        if !(1..=3650).contains(&self.minute_retention_days) {
            p.push(
                "minute_retention_days",
                format!("{} is out of range 1..=3650", self.minute_retention_days),
            );
        }
        if !(self.minute_retention_days.max(1)..=3650).contains(&self.hour_retention_days) {
            p.push(
                "hour_retention_days",
                format!(
                    "{} is out of range minute_retention_days ({})..=3650",
                    self.hour_retention_days, self.minute_retention_days
                ),
            );
        }
        if self.rollup_after_hours > 720 {
            p.push(
                "rollup_after_hours",
                format!("{} is out of range 0..=720", self.rollup_after_hours),
            );
        }
        self.limits.validate(&mut p);
        if let Err(e) = crate::auth::validate_trust_domain(&self.trust_domain) {
            p.push("trust_domain", e);
        }
        if self.data_dir.as_os_str().is_empty() {
            p.push("data_dir", "must not be empty");
        }
        check_readable(&mut p, "tls.ca", &self.tls.ca);
        check_readable(&mut p, "tls.cert", &self.tls.cert);
        check_readable(&mut p, "tls.key", &self.tls.key);
        if let Some(revoked) = &self.tls.revoked {
            match std::fs::read_to_string(revoked) {
                Ok(text) => {
                    if let Err(err) = crate::tls::DenyList::parse(revoked, &text) {
                        p.push("tls.revoked", err.to_string());
                    }
                }
                Err(err) => p.push("tls.revoked", format!("{}: {err}", revoked.display())),
            }
        }
        let url = self.store.url.as_str();
        if !(url.is_empty()
            || url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            p.push(
                "store.url",
                format!(
                    "{:?} is not sqlite:PATH or postgres://user@host:port/db",
                    url.split('@').next_back().unwrap_or("")
                ),
            );
        }
        if let Some(m) = self.metrics.listen
            && m.port() != 0
            && m.port() == self.listen.port()
            && (m.ip() == self.listen.ip()
                || m.ip().is_unspecified()
                || self.listen.ip().is_unspecified())
        {
            p.push(
                "metrics.listen",
                format!("{m} overlaps the gRPC listen address {}", self.listen),
            );
        }
        if let Some(h) = self.http.listen {
            let overlaps = |other: SocketAddr| {
                h.port() != 0
                    && h.port() == other.port()
                    && (h.ip() == other.ip()
                        || h.ip().is_unspecified()
                        || other.ip().is_unspecified())
            };
            if overlaps(self.listen) {
                p.push(
                    "http.listen",
                    format!("{h} overlaps the gRPC listen address {}", self.listen),
                );
            }
            if let Some(m) = self.metrics.listen
                && overlaps(m)
            {
                p.push("http.listen", format!("{h} overlaps metrics.listen {m}"));
            }
        }
        for problem in crate::geo::validate(&self.geo) {
            p.0.push(problem);
        }
        for problem in crate::alert::validate(&self.alert) {
            p.0.push(problem);
        }
        for (field, problem) in crate::derive::validate(&self.derive) {
            p.push(&field, problem);
        }
        if let Some(key) = &self.enroll.ca_key {
            check_readable(&mut p, "enroll.ca_key", key);
        }
        if !(10..=3650 * 86_400).contains(&self.enroll.validity_secs) {
            p.push(
                "enroll.validity_secs",
                format!(
                    "{} is out of range 10..=315360000",
                    self.enroll.validity_secs
                ),
            );
        }
        if let Some(path) = &self.policy
            && let Err(e) = crate::policy::Policy::load(path)
        {
            p.push("policy", format!("{}: {e}", path.display()));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_file_gets_documented_defaults() {
        let c: CollectorConfig =
            toml::from_str("[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n").unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.max_report_bytes, DEFAULT_MAX_REPORT_BYTES);
        assert_eq!(c.metrics.listen, None);
    }

    #[test]
    fn aggregates_may_not_be_kept_shorter_than_raw_rows() {
        let tls = "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        let c: CollectorConfig = toml::from_str(tls).unwrap();
        assert_eq!(c.aggregate_retention_days, DEFAULT_AGGREGATE_RETENTION_DAYS);
        let c: CollectorConfig = toml::from_str(&format!(
            "retention_days = 90\naggregate_retention_days = 60\n{tls}"
        ))
        .unwrap();
        let problems = c.validate().to_string();
        assert!(
            problems.contains("aggregate_retention_days: 60 is out of range retention_days (90)"),
            "{problems}"
        );
    }

    #[test]
    fn minutes_may_not_be_kept_longer_than_hours() {
        let tls = "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        let c: CollectorConfig = toml::from_str(tls).unwrap();
        assert_eq!(
            (c.minute_retention_days, c.hour_retention_days),
            (DEFAULT_MINUTE_RETENTION_DAYS, DEFAULT_HOUR_RETENTION_DAYS)
        );
        assert!(!c.validate().to_string().contains("retention"));
        let c: CollectorConfig = toml::from_str(&format!(
            "minute_retention_days = 40\nhour_retention_days = 30\n{tls}"
        ))
        .unwrap();
        let problems = c.validate().to_string();
        assert!(
            problems.contains("hour_retention_days: 30 is out of range minute_retention_days (40)"),
            "{problems}"
        );
        let c: CollectorConfig =
            toml::from_str(&format!("minute_retention_days = 0\n{tls}")).unwrap();
        let problems = c.validate().to_string();
        assert!(
            problems.contains("minute_retention_days: 0 is out of range 1..=3650"),
            "{problems}"
        );
    }

    #[test]
    fn enrollment_is_off_by_default_and_its_lifetime_is_bounded() {
        let tls = "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        let c: CollectorConfig = toml::from_str(tls).unwrap();
        assert_eq!(c.enroll, EnrollConfig::default());
        assert_eq!(c.enroll.ca_key, None);
        let c: CollectorConfig = toml::from_str(&format!(
            "{tls}[enroll]\nca_key = \"/nonexistent/ca.key\"\nvalidity_secs = 5\n"
        ))
        .unwrap();
        let problems = c.validate().to_string();
        assert!(problems.contains("enroll.ca_key"), "{problems}");
        assert!(problems.contains("enroll.validity_secs: 5"), "{problems}");
        assert!(
            toml::from_str::<CollectorConfig>(&format!("{tls}[enroll]\nca = \"x\"\n")).is_err()
        );
    }

    #[test]
    fn metrics_listen_is_parsed_and_may_not_take_the_grpc_port() {
        let tls = "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        let c: CollectorConfig =
            toml::from_str(&format!("{tls}[metrics]\nlisten = \"127.0.0.1:9464\"\n")).unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(!c.validate().to_string().contains("metrics"));
        let err = toml::from_str::<CollectorConfig>(&format!("{tls}[metrics]\nlisen = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
        let c: CollectorConfig =
            toml::from_str(&format!("{tls}[metrics]\nlisten = \"127.0.0.1:7443\"\n")).unwrap();
        assert!(c.validate().to_string().contains("metrics.listen"));
    }

    #[test]
    fn http_listen_is_parsed_and_may_not_take_the_grpc_or_metrics_port() {
        let tls = "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        let c: CollectorConfig =
            toml::from_str(&format!("{tls}[http]\nlisten = \"127.0.0.1:8443\"\n")).unwrap();
        assert_eq!(c.http.listen, Some("127.0.0.1:8443".parse().unwrap()));
        assert!(!c.validate().to_string().contains("http.listen"));
        let c: CollectorConfig = toml::from_str(&format!(
            "{tls}[http]\nlisten = \"0.0.0.0:7443\"\n[metrics]\nlisten = \"127.0.0.1:9000\"\n"
        ))
        .unwrap();
        assert!(c.validate().to_string().contains("http.listen"));
        let c: CollectorConfig = toml::from_str(&format!(
            "{tls}[http]\nlisten = \"127.0.0.1:9000\"\n[metrics]\nlisten = \"127.0.0.1:9000\"\n"
        ))
        .unwrap();
        assert!(
            c.validate()
                .to_string()
                .contains("metrics.listen 127.0.0.1:9000")
        );
        assert!(
            toml::from_str::<CollectorConfig>(&format!("{tls}[http]\nlistn = \"x\"\n")).is_err()
        );
    }

    #[test]
    fn the_example_config_in_deploy_parses() {
        let c: CollectorConfig =
            toml::from_str(include_str!("../../deploy/collector.toml")).unwrap();
        assert_eq!(c.listen.port(), 7443);
        let problems = c.validate();
        assert!(
            problems.0.iter().all(|p| p.starts_with("tls.")),
            "{problems}"
        );
    }

    #[test]
    fn a_policy_file_must_load() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("policy.toml");
        std::fs::write(&good, "jurisdiction = \"MA\"\n").unwrap();
        let tls = "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        let c: CollectorConfig =
            toml::from_str(&format!("policy = {:?}\n{tls}", good.display().to_string())).unwrap();
        assert_eq!(c.policy.as_deref(), Some(good.as_path()));
        assert!(!c.validate().to_string().contains("policy"));
        let c: CollectorConfig =
            toml::from_str(&format!("policy = \"/no/policy.toml\"\n{tls}")).unwrap();
        assert!(c.validate().to_string().contains("policy"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let err = toml::from_str::<CollectorConfig>(
            "lisen = \"x\"\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("lisen"), "{err}");
        let c: CollectorConfig = toml::from_str(
            "max_report_bytes = 10\nmax_connections = 0\ntls_handshake_timeout_secs = 0\ntrust_domain = \"a b\"\n[tls]\nca=\"/no/a\"\ncert=\"/no/b\"\nkey=\"/no/c\"\nrevoked=\"/no/revoked\"\n",
        )
        .unwrap();
        let all = c.validate().to_string();
        for needle in [
            "max_report_bytes",
            "max_connections",
            "tls_handshake_timeout_secs",
            "tls.revoked",
            "trust_domain",
            "tls.ca",
            "tls.cert",
            "tls.key",
        ] {
            assert!(all.contains(needle), "missing {needle} in {all}");
        }
    }

    #[test]
    fn a_malformed_revocation_list_is_refused_naming_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let revoked = dir.path().join("revoked.txt");
        std::fs::write(&revoked, "# fine\nserial:0a\nnot-a-fingerprint\n").unwrap();
        let mut c: CollectorConfig =
            toml::from_str("[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n").unwrap();
        assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(
            c.tls_handshake_timeout_secs,
            DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS
        );
        c.tls.revoked = Some(revoked);
        let all = c.validate().to_string();
        assert!(
            all.contains("tls.revoked") && all.contains("line 3"),
            "{all}"
        );
    }
}
