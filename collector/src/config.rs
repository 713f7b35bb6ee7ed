//! The collector's TOML configuration: strict, documented defaults, every problem at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sov_common::config::{ConfigError, Problems, check_readable, read_toml};

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
/// Default most gRPC connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default longest TLS handshake, seconds.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS: u64 = 10;

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
    /// Most gRPC connections open at once, handshaking or established; more are closed as
    /// soon as they are accepted. Keep it under the process's open-file limit. Default 4096.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest a TLS handshake may take before the connection is dropped (connections that
    /// never send, or send a byte at a time), seconds, 1..=300. Default 10.
    #[serde(default = "default_tls_handshake_timeout_secs")]
    pub tls_handshake_timeout_secs: u64,
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
    /// `[http]`: the HTTPS JSON API and the web page (off by default).
    #[serde(default)]
    pub http: HttpConfig,
    /// `[enroll]`: nodes enroll with one-time tokens and renew their certificates (off unless
    /// `ca_key` is set).
    #[serde(default)]
    pub enroll: EnrollConfig,
    /// Policy file (jurisdiction, thresholds, `[[allow]]`, ...). When set, the collector
    /// evaluates the built-in breach rules against it every few seconds and reloads it when it
    /// changes; the file must load at start. Default: none (no breach rules run).
    #[serde(default)]
    pub policy: Option<PathBuf>,
}

/// `[alert]`: the sinks that receive every breach state change (open, updated, resolved).
/// Each sink may be routed: it receives an alert when the alert's rule is in `rules` (empty:
/// every rule) and its severity is at least `min_severity`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// `[[alert.webhook]]`: generic webhooks (JSON body, optional HMAC-SHA256 signature).
    #[serde(default)]
    pub webhook: Vec<WebhookSinkConfig>,
    /// `[[alert.alertmanager]]`: Prometheus Alertmanager v2 (`POST <url>/api/v2/alerts`).
    #[serde(default)]
    pub alertmanager: Vec<AlertmanagerSinkConfig>,
    /// `[[alert.slack]]`: Slack incoming webhooks.
    #[serde(default)]
    pub slack: Vec<SlackSinkConfig>,
    /// `[[alert.syslog]]`: syslog receivers (RFC 5424 over UDP or TCP).
    #[serde(default)]
    pub syslog: Vec<SyslogSinkConfig>,
    /// Longest wait between two tries of an undelivered alert, seconds, 1..=3600. Default 300
    /// (the delay doubles from 1 s up to it).
    #[serde(default)]
    pub retry_max_secs: Option<u64>,
}

impl AlertConfig {
    /// `retry_max_secs` or its default.
    pub fn retry_max(&self) -> std::time::Duration {
        self.retry_max_secs
            .map_or(crate::alert::RETRY_MAX, std::time::Duration::from_secs)
    }
}

/// One `[[alert.webhook]]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookSinkConfig {
    /// `http://` or `https://` URL the alert is POSTed to.
    pub url: String,
    /// Shared secret: when set, `X-Sovereign-Signature: sha256=<hex HMAC-SHA256(secret, body)>`.
    #[serde(default)]
    pub secret: Option<String>,
    /// PEM CA certificate(s) trusted for an `https://` URL instead of the public roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Rules routed to this sink; empty (the default) means every rule.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Lowest severity routed to this sink: "info" (the default), "warning" or "critical".
    #[serde(default)]
    pub min_severity: Option<String>,
}

/// One `[[alert.alertmanager]]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerSinkConfig {
    /// Alertmanager base URL, e.g. "http://alertmanager:9093" (`/api/v2/alerts` is appended).
    pub url: String,
    /// PEM CA certificate(s) trusted for an `https://` URL instead of the public roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Rules routed to this sink; empty (the default) means every rule.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Lowest severity routed to this sink: "info" (the default), "warning" or "critical".
    #[serde(default)]
    pub min_severity: Option<String>,
}

/// One `[[alert.slack]]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SlackSinkConfig {
    /// The incoming webhook URL, e.g. "https://hooks.slack.com/services/...".
    pub url: String,
    /// PEM CA certificate(s) trusted for an `https://` URL instead of the public roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Rules routed to this sink; empty (the default) means every rule.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Lowest severity routed to this sink: "info" (the default), "warning" or "critical".
    #[serde(default)]
    pub min_severity: Option<String>,
}

/// One `[[alert.syslog]]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SyslogSinkConfig {
    /// "udp://host:514" (one datagram per alert) or "tcp://host:601" (RFC 6587 octet counting).
    pub address: String,
    /// Rules routed to this sink; empty (the default) means every rule.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Lowest severity routed to this sink: "info" (the default), "warning" or "critical".
    #[serde(default)]
    pub min_severity: Option<String>,
}

/// `[enroll]`: enrollment without copying keys (`sov-agent enroll`) and certificate renewal.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnrollConfig {
    /// The CA's private key (PEM), matching a certificate in `tls.ca`. When set, the collector
    /// signs agent certificates for enrollment tokens and renews them; when absent (the
    /// default), `Enroll` and `Renew` answer FAILED_PRECONDITION.
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// Lifetime of the certificates it signs, seconds. Default 2592000 (30 days); agents renew
    /// at two thirds of it.
    #[serde(default = "default_enroll_validity_secs")]
    pub validity_secs: u64,
}

impl Default for EnrollConfig {
    fn default() -> Self {
        Self {
            ca_key: None,
            validity_secs: default_enroll_validity_secs(),
        }
    }
}

/// Default lifetime of enrolled certificates: 30 days.
pub const DEFAULT_ENROLL_VALIDITY_SECS: u64 = 30 * 86_400;

fn default_enroll_validity_secs() -> u64 {
    DEFAULT_ENROLL_VALIDITY_SECS
}

/// `[metrics]`: Prometheus text exposition of the collector's own health (counters and
/// gauges only, never inventory or flow data) on plain HTTP, without authentication.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address serving `GET /metrics`, e.g. "127.0.0.1:9464". Default: none (off).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `[http]`: the HTTPS JSON API under `/api/v1/` and the read-only web page at `/`, with the
/// collector's certificate; callers present a client certificate (role regulator or admin) or
/// `Authorization: Bearer TOKEN`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address serving HTTPS, e.g. "127.0.0.1:8443". Default: none (off).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `[store]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// "" or "sqlite:" (embedded SQLite under `data_dir`, the default), "sqlite:DIR" (relative
    /// to `data_dir`), or "postgres://user@host:port/db" for several collector replicas on one
    /// PostgreSQL.
    #[serde(default)]
    pub url: String,
}

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

/// `[tls]`: PEM files of the server side of mutual TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsFiles {
    /// CA certificate that client certificates must chain to.
    pub ca: PathBuf,
    /// The collector's certificate.
    pub cert: PathBuf,
    /// The collector's private key.
    pub key: PathBuf,
    /// Deny list of client certificates refused although they chain to `ca`: one per line,
    /// the SHA-256 fingerprint of the certificate (64 hex digits, `:` allowed), `serial:HEX`,
    /// or `id:spiffe://<trust-domain>/<role>/<name>` (every certificate of that identity, also
    /// those renewed later); `#` comments. Refused certificates fail the TLS handshake (alert
    /// `certificate_revoked`) on gRPC and HTTPS. `ca`, `cert`, `key` and this file are
    /// re-read every 2 seconds; a change applies to new connections without a restart.
    /// Default: none.
    #[serde(default)]
    pub revoked: Option<PathBuf>,
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
fn default_retention_days() -> u32 {
    DEFAULT_RETENTION_DAYS
}
fn default_aggregate_retention_days() -> u32 {
    DEFAULT_AGGREGATE_RETENTION_DAYS
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_tls_handshake_timeout_secs() -> u64 {
    DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS
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
            retention_days: DEFAULT_RETENTION_DAYS,
            aggregate_retention_days: DEFAULT_AGGREGATE_RETENTION_DAYS,
            trust_domain: default_trust_domain(),
            tls,
            geo: GeoConfig::default(),
            store: StoreConfig::default(),
            metrics: MetricsConfig::default(),
            alert: AlertConfig::default(),
            http: HttpConfig::default(),
            enroll: EnrollConfig::default(),
            policy: None,
        }
    }

    /// Load and validate a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = read_toml(path)?;
        cfg.validate().into_result()?;
        Ok(cfg)
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
