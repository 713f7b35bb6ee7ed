//! Breach alerts: one [`Sink`] trait, one file per kind of receiver, routing, and the retry
//! schedule of the outbox that calls [`attempt`].
//!
//! Parts:
//! - [`config`]: the `[alert]` section, one table per sink;
//! - [`http`]: a small HTTP/1.1 client (POST, `Connection: close`, http and https);
//! - [`webhook`]: generic JSON webhook, signed with HMAC-SHA256 when a secret is set;
//! - [`alertmanager`]: Prometheus Alertmanager v2 (`POST <url>/api/v2/alerts`);
//! - [`slack`]: Slack incoming webhook (one text line);
//! - [`syslog`]: RFC 5424 over UDP (one datagram) or TCP (RFC 6587 octet counting).
//!
//! The caller (the store's outbox) records one row per (breach state change, sink name) for
//! every sink that [`Sink::accepts`] the alert, calls [`attempt`] until it says
//! [`Attempt::Delivered`] or [`Attempt::Failed`], and waits [`retry_delay`] between tries.

pub mod alertmanager;
pub mod config;
pub mod http;
pub mod outbox;
pub mod slack;
pub mod syslog;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sov_common::error::error_line;

pub use config::{
    AlertConfig, AlertmanagerSinkConfig, SlackSinkConfig, SyslogSinkConfig, WebhookSinkConfig,
};

pub use alertmanager::AlertmanagerSink;
pub use slack::SlackSink;
pub use syslog::SyslogSink;
pub use webhook::WebhookSink;

/// First retry delay.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// Connecting to a receiver may take this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One whole delivery (connect, TLS, request, status line) may take this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Breach states an alert reports.
pub const STATES: [&str; 3] = ["open", "updated", "resolved"];

/// One breach state change, as every sink receives it. The webhook body is exactly this.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// Sequence number of the breach log record of this state change: unique per change, so
    /// a receiver can drop an alert it already has (after a collector crash between a
    /// delivery and its bookkeeping the same alert may come twice).
    pub seq: u64,
    /// Stable id of the breach (the same for its open, updates and resolution).
    pub breach_id: String,
    /// Policy rule that was violated, e.g. "foreign-egress".
    pub rule: String,
    /// "open", "updated" or "resolved".
    pub state: String,
    /// "info", "warning" or "critical".
    pub severity: String,
    /// Node the breach is on.
    pub node: String,
    /// What is in breach (a model, a process, a destination), in words.
    pub subject: String,
    /// The facts that made the verdict, as JSON.
    pub evidence: serde_json::Value,
    /// When this state change happened (RFC 3339).
    pub at: String,
    /// When the breach opened (RFC 3339).
    pub opened_at: String,
    /// When the breach was resolved (RFC 3339), for "resolved".
    pub resolved_at: Option<String>,
    /// The latest signed checkpoint of the breach log's head when the alert was sent
    /// ([`sov_evidence::checkpoint::SignedCheckpoint::to_json`]): kept by the receiver, it lets
    /// `sov-collector verify-log --checkpoint FILE` find a log rewritten or cut short later.
    /// Absent when none was signed yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<serde_json::Value>,
}

/// Alert severities, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// "info".
    Info,
    /// "warning".
    Warning,
    /// "critical".
    Critical,
}

impl Severity {
    /// Parse "info", "warning" or "critical".
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "info" => Some(Self::Info),
            "warning" => Some(Self::Warning),
            "critical" => Some(Self::Critical),
            _ => None,
        }
    }
}

/// Which alerts one sink receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Rules routed here; empty means every rule.
    pub rules: Vec<String>,
    /// Lowest severity routed here.
    pub min_severity: Severity,
}

impl Route {
    /// From a sink's `rules` and `min_severity` (unknown severities are refused by [`validate`]).
    pub fn new(rules: &[String], min_severity: Option<&str>) -> Result<Self, String> {
        let min_severity = match min_severity {
            None => Severity::Info,
            Some(s) => Severity::parse(s).ok_or_else(|| bad_severity(s))?,
        };
        Ok(Self {
            rules: rules.to_vec(),
            min_severity,
        })
    }

    /// The alert's rule is routed here and its severity is high enough. An alert with an
    /// unknown severity counts as critical (better too many alerts than a lost one).
    pub fn accepts(&self, a: &Alert) -> bool {
        let severity = Severity::parse(&a.severity).unwrap_or(Severity::Critical);
        (self.rules.is_empty() || self.rules.contains(&a.rule)) && severity >= self.min_severity
    }
}

/// A receiver of alerts.
#[async_trait::async_trait]
pub trait Sink: Send + Sync + std::fmt::Debug {
    /// Stable name, `<kind>:<index in the config>`, e.g. "webhook:0".
    fn name(&self) -> &str;
    /// Routing: whether this sink receives `a`.
    fn accepts(&self, a: &Alert) -> bool;
    /// Deliver once (no retry here); bounded by [`REQUEST_TIMEOUT`].
    async fn deliver(&self, a: &Alert) -> Result<(), DeliveryError>;
}

/// Why one delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver could not be reached.
    #[error("connect to {addr}")]
    Connect {
        /// host:port.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (untrusted certificate, wrong name, protocol).
    #[error("tls handshake with {addr}")]
    Tls {
        /// host:port.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A step took too long.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The receiver answered with a status other than 2xx.
    #[error("receiver answered {code}: {body_prefix}")]
    Status {
        /// HTTP status code.
        code: u16,
        /// The first bytes of the response body, for the log.
        body_prefix: String,
    },
    /// Reading or writing failed after connecting, or the answer was not HTTP.
    #[error("i/o")]
    Io(#[source] std::io::Error),
    /// The alert cannot be encoded for this sink (never succeeds on retry).
    #[error("encode: {0}")]
    Encode(String),
}

impl DeliveryError {
    /// Whether a later retry may succeed: everything but a 4xx other than 429, and an alert
    /// the sink cannot encode.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Status { code, .. } => *code >= 500 || *code == 429,
            Self::Encode(_) => false,
            Self::Connect { .. } | Self::Tls { .. } | Self::Timeout(_) | Self::Io(_) => true,
        }
    }
}

/// What the outbox does after one [`attempt`].
#[derive(Debug)]
pub enum Attempt {
    /// Delivered: mark the outbox row done.
    Delivered,
    /// Failed, may succeed later: try again after `after`.
    Retry {
        /// Why it failed.
        error: DeliveryError,
        /// When to try again ([`retry_delay`]).
        after: Duration,
    },
    /// Failed for good (the receiver refused the alert): mark the row failed, keep the error.
    Failed(DeliveryError),
}

/// Deliver `a` to `sink` once. `failures` is how many tries of this row already failed (0 on
/// the first try); it picks the delay of the next retry. Logs the outcome.
pub async fn attempt(sink: &dyn Sink, a: &Alert, failures: u32) -> Attempt {
    match sink.deliver(a).await {
        Ok(()) => {
            tracing::info!(sink = sink.name(), breach_id = %a.breach_id, state = %a.state, "alert delivered");
            Attempt::Delivered
        }
        Err(error) if error.retryable() => {
            let after = retry_delay(failures.saturating_add(1));
            tracing::warn!(sink = sink.name(), breach_id = %a.breach_id, state = %a.state,
                error = %error_line(&error), retry_in_ms = after.as_millis() as u64, "alert delivery failed");
            Attempt::Retry { error, after }
        }
        Err(error) => {
            tracing::error!(sink = sink.name(), breach_id = %a.breach_id, state = %a.state,
                error = %error_line(&error), "alert refused by the receiver; not retried");
            Attempt::Failed(error)
        }
    }
}

/// The sinks routed to `a`, in configuration order.
pub fn routed<'a>(sinks: &'a [Arc<dyn Sink>], a: &Alert) -> Vec<&'a Arc<dyn Sink>> {
    sinks.iter().filter(|s| s.accepts(a)).collect()
}

/// Retry schedule for the outbox: jittered exponential from 1 s to 5 min.
///
/// `attempt` is the number of failed tries so far (1 before the first retry; 0 is treated as
/// 1). The nominal delay doubles from 1 s and is capped at 5 min; the delay returned is drawn
/// in the upper quarter below it (75–100 %), never under 1 s, so many outbox rows that failed
/// together do not retry in lockstep.
pub fn retry_delay(attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(20);
    let nominal = RETRY_MIN
        .saturating_mul(1u32 << exp)
        .min(RETRY_MAX)
        .as_millis() as u64;
    let jitter = random_u64() % (nominal / 4 + 1);
    Duration::from_millis(nominal - jitter).max(RETRY_MIN)
}

pub(crate) fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_ok() {
        u64::from_le_bytes(b)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0)
    }
}

/// Build every configured sink, named `<kind>:<index>`. Fails on what [`validate`] refuses
/// and on a `ca` file that holds no certificate.
pub fn sinks_from_config(cfg: &AlertConfig) -> Result<Vec<Arc<dyn Sink>>, String> {
    let problems = validate(cfg);
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let mut out: Vec<Arc<dyn Sink>> = Vec::new();
    for (i, c) in cfg.webhook.iter().enumerate() {
        out.push(Arc::new(WebhookSink::new(format!("webhook:{i}"), c)?));
    }
    for (i, c) in cfg.alertmanager.iter().enumerate() {
        out.push(Arc::new(AlertmanagerSink::new(
            format!("alertmanager:{i}"),
            c,
        )?));
    }
    for (i, c) in cfg.slack.iter().enumerate() {
        out.push(Arc::new(SlackSink::new(format!("slack:{i}"), c)?));
    }
    for (i, c) in cfg.syslog.iter().enumerate() {
        out.push(Arc::new(SyslogSink::new(format!("syslog:{i}"), c)?));
    }
    Ok(out)
}

/// Every problem in `[alert]`, each naming its field (`alert.webhook[0].url: ...`).
pub fn validate(cfg: &AlertConfig) -> Vec<String> {
    let mut p = Vec::new();
    if let Some(secs) = cfg.retry_max_secs
        && !(1..=3600).contains(&secs)
    {
        p.push(format!(
            "alert.retry_max_secs: {secs} is out of range 1..=3600"
        ));
    }
    let route = |field: String, rules: &[String], min: &Option<String>, p: &mut Vec<String>| {
        if let Some(m) = min
            && Severity::parse(m).is_none()
        {
            p.push(format!("{field}.min_severity: {}", bad_severity(m)));
        }
        for (j, r) in rules.iter().enumerate() {
            if r.trim().is_empty() {
                p.push(format!("{field}.rules[{j}]: must not be empty"));
            }
        }
    };
    let http = |field: String, url: &str, ca: &Option<std::path::PathBuf>, p: &mut Vec<String>| {
        match http::Endpoint::parse(url) {
            Ok(e) => {
                if ca.is_some() && !e.https {
                    p.push(format!("{field}.ca: only applies to an https:// url"));
                }
            }
            Err(e) => p.push(format!("{field}.url: {e}")),
        }
        if let Some(ca) = ca
            && let Err(e) = std::fs::File::open(ca)
        {
            p.push(format!("{field}.ca: cannot read {}: {e}", ca.display()));
        }
    };
    for (i, c) in cfg.webhook.iter().enumerate() {
        let f = format!("alert.webhook[{i}]");
        http(f.clone(), &c.url, &c.ca, &mut p);
        if c.secret.as_deref().is_some_and(str::is_empty) {
            p.push(format!(
                "{f}.secret: must not be empty (leave it out to send unsigned)"
            ));
        }
        route(f, &c.rules, &c.min_severity, &mut p);
    }
    for (i, c) in cfg.alertmanager.iter().enumerate() {
        let f = format!("alert.alertmanager[{i}]");
        http(f.clone(), &c.url, &c.ca, &mut p);
        route(f, &c.rules, &c.min_severity, &mut p);
    }
    for (i, c) in cfg.slack.iter().enumerate() {
        let f = format!("alert.slack[{i}]");
        http(f.clone(), &c.url, &c.ca, &mut p);
        route(f, &c.rules, &c.min_severity, &mut p);
    }
    for (i, c) in cfg.syslog.iter().enumerate() {
        let f = format!("alert.syslog[{i}]");
        if let Err(e) = syslog::Target::parse(&c.address) {
            p.push(format!("{f}.address: {e}"));
        }
        route(f, &c.rules, &c.min_severity, &mut p);
    }
    p
}

fn bad_severity(s: &str) -> String {
    format!("{s:?} is not one of \"info\", \"warning\", \"critical\"")
}

/// `[CRITICAL] foreign-egress OPEN on node-a: <subject>`: the one line Slack and syslog show.
pub fn summary(a: &Alert) -> String {
    format!(
        "[{}] {} {} on {}: {}",
        a.severity.to_uppercase(),
        a.rule,
        a.state.to_uppercase(),
        a.node,
        a.subject
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn alert(state: &str) -> Alert {
        Alert {
            seq: 1,
            breach_id: "b-1".into(),
            rule: "foreign-egress".into(),
            state: state.into(),
            severity: "critical".into(),
            node: "node-a".into(),
            subject: "python3 sent 5 MB to US".into(),
            evidence: serde_json::json!({"country": "US", "bytes": 5_000_000}),
            at: "2025-01-02T03:04:05Z".into(),
            opened_at: "2025-01-02T03:00:00Z".into(),
            resolved_at: (state == "resolved").then(|| "2025-01-02T03:04:05Z".into()),
            checkpoint: None,
        }
    }

    #[test]
    fn retry_delays_grow_from_one_second_to_five_minutes_with_jitter() {
        for attempt in 0..100 {
            let d = retry_delay(attempt);
            assert!(d >= RETRY_MIN && d <= RETRY_MAX, "{attempt}: {d:?}");
        }
        assert_eq!(retry_delay(0), RETRY_MIN);
        assert_eq!(retry_delay(1), RETRY_MIN);
        let d = retry_delay(4);
        assert!(
            d >= Duration::from_secs(6) && d <= Duration::from_secs(8),
            "{d:?}"
        );
        let late: std::collections::HashSet<_> = (0..50).map(|_| retry_delay(30)).collect();
        assert!(late.len() > 1, "no jitter");
        assert!(late.iter().all(|d| *d >= Duration::from_secs(225)));
    }

    #[test]
    fn validation_names_every_bad_field() {
        let cfg = AlertConfig {
            webhook: vec![WebhookSinkConfig {
                url: "ftp://x".into(),
                secret: Some(String::new()),
                min_severity: Some("loud".into()),
                rules: vec![" ".into()],
                ca: Some("/no/ca.pem".into()),
            }],
            syslog: vec![SyslogSinkConfig {
                address: "host:514".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let all = validate(&cfg).join("\n");
        for needle in [
            "alert.webhook[0].url",
            "alert.webhook[0].secret",
            "alert.webhook[0].min_severity",
            "alert.webhook[0].rules[0]",
            "alert.webhook[0].ca",
            "alert.syslog[0].address",
        ] {
            assert!(all.contains(needle), "missing {needle} in {all}");
        }
        assert!(sinks_from_config(&cfg).is_err());
        assert!(validate(&AlertConfig::default()).is_empty());
    }

    #[test]
    fn an_alert_config_parses_from_toml_and_unknown_keys_are_refused() {
        let cfg: AlertConfig = toml::from_str(
            "[[webhook]]\nurl = \"https://h.example/x\"\nsecret = \"s\"\n[[alertmanager]]\nurl = \"http://am:9093\"\n[[slack]]\nurl = \"https://hooks.slack.com/services/T/B/X\"\n[[syslog]]\naddress = \"udp://127.0.0.1:514\"\nrules = [\"foreign-egress\"]\nmin_severity = \"warning\"\n",
        )
        .unwrap();
        assert!(validate(&cfg).is_empty(), "{:?}", validate(&cfg));
        let names: Vec<_> = sinks_from_config(&cfg)
            .unwrap()
            .iter()
            .map(|s| s.name().to_owned())
            .collect();
        assert_eq!(
            names,
            ["webhook:0", "alertmanager:0", "slack:0", "syslog:0"]
        );
        let err = toml::from_str::<AlertConfig>("[[webhook]]\nurl = \"http://x\"\nsecrt = \"s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("secrt"), "{err}");
    }

    #[test]
    fn routing_takes_the_rule_list_and_the_minimum_severity() {
        let r = Route::new(&["foreign-egress".into()], Some("warning")).unwrap();
        let mut a = alert("open");
        assert!(r.accepts(&a));
        a.severity = "info".into();
        assert!(!r.accepts(&a));
        a.severity = "warning".into();
        a.rule = "restricted-model".into();
        assert!(!r.accepts(&a));
        assert!(Route::new(&[], None).unwrap().accepts(&a));
        assert!(Route::new(&[], Some("loud")).is_err());
    }

    #[test]
    fn four_hundreds_are_permanent_and_the_rest_retry() {
        let status = |code| DeliveryError::Status {
            code,
            body_prefix: String::new(),
        };
        assert!(status(500).retryable());
        assert!(status(503).retryable());
        assert!(status(429).retryable());
        assert!(!status(400).retryable());
        assert!(!status(404).retryable());
        assert!(DeliveryError::Timeout("connect").retryable());
    }

    #[test]
    fn the_summary_line_is_readable() {
        assert_eq!(
            summary(&alert("open")),
            "[CRITICAL] foreign-egress OPEN on node-a: python3 sent 5 MB to US"
        );
    }
}
