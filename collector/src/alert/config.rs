//! `[alert]`: which receivers get every breach state change, and how each is routed.

use std::path::PathBuf;

use serde::Deserialize;

use super::Route;

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
            .map_or(super::RETRY_MAX, std::time::Duration::from_secs)
    }
}

/// Declares the tables of `[[alert.<kind>]]`: each kind's own fields, then the routing fields
/// every sink takes (`rules`, `min_severity`) and [`route`](WebhookSinkConfig::route). A macro
/// because serde cannot `flatten` a shared struct into a table that refuses unknown keys
/// (`deny_unknown_fields`), and a sink's table must refuse them like every other.
macro_rules! sink_configs {
    ($($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* })*) => {$(
        $(#[$meta])*
        #[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// Rules routed to this sink; empty (the default) means every rule.
            #[serde(default)]
            pub rules: Vec<String>,
            /// Lowest severity routed to this sink: "info" (the default), "warning" or
            /// "critical".
            #[serde(default)]
            pub min_severity: Option<String>,
        }

        impl $name {
            /// Which alerts this sink receives.
            pub fn route(&self) -> Result<Route, String> {
                Route::new(&self.rules, self.min_severity.as_deref())
            }
        }
    )*};
}

sink_configs! {
    /// One `[[alert.webhook]]`.
    WebhookSinkConfig {
        /// `http://` or `https://` URL the alert is POSTed to.
        url: String,
        /// Shared secret: when set, `X-Sovereign-Signature: sha256=<hex HMAC-SHA256(secret, body)>`.
        #[serde(default)]
        secret: Option<String>,
        /// PEM CA certificate(s) trusted for an `https://` URL instead of the public roots.
        #[serde(default)]
        ca: Option<PathBuf>,
    }

    /// One `[[alert.alertmanager]]`.
    AlertmanagerSinkConfig {
        /// Alertmanager base URL, e.g. "http://alertmanager:9093" (`/api/v2/alerts` is appended).
        url: String,
        /// PEM CA certificate(s) trusted for an `https://` URL instead of the public roots.
        #[serde(default)]
        ca: Option<PathBuf>,
    }

    /// One `[[alert.slack]]`.
    SlackSinkConfig {
        /// The incoming webhook URL, e.g. "https://hooks.slack.com/services/...".
        url: String,
        /// PEM CA certificate(s) trusted for an `https://` URL instead of the public roots.
        #[serde(default)]
        ca: Option<PathBuf>,
    }

    /// One `[[alert.syslog]]`.
    SyslogSinkConfig {
        /// "udp://host:514" (one datagram per alert) or "tcp://host:601" (RFC 6587 octet counting).
        address: String,
    }
}
