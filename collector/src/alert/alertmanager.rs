//! Prometheus Alertmanager v2: `POST <url>/api/v2/alerts` with one alert whose labels
//! identify the breach; `endsAt` is set only on resolve.
//!
//! Alertmanager resolves an alert by itself when it is not re-sent within its
//! `resolve_timeout` (5 min by default); an open breach stays firing there only if it is
//! re-sent (each "updated" state change does that).

use super::config::AlertmanagerSinkConfig;
use super::http::Endpoint;
use super::{Alert, DeliveryError, Route, Sink, summary};

/// The API path appended to the configured URL.
pub const ALERTS_PATH: &str = "/api/v2/alerts";

/// One `[[alert.alertmanager]]`.
#[derive(Debug)]
pub struct AlertmanagerSink {
    name: String,
    endpoint: Endpoint,
    route: Route,
}

impl AlertmanagerSink {
    /// Build from its configuration.
    pub fn new(name: String, c: &AlertmanagerSinkConfig) -> Result<Self, String> {
        let endpoint =
            Endpoint::new(&c.url, c.ca.as_deref()).map_err(|e| format!("{name}: {e}"))?;
        let path = format!("{}{ALERTS_PATH}", endpoint.path.trim_end_matches('/'));
        Ok(Self {
            endpoint: endpoint.with_path(path),
            route: c.route().map_err(|e| format!("{name}: {e}"))?,
            name,
        })
    }
}

/// `sovereign_<rule>`, with characters other than ASCII letters, digits and `_` as `_`.
pub fn alertname(rule: &str) -> String {
    let cleaned: String = rule
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("sovereign_{cleaned}")
}

/// The request body: a list of one postable alert.
pub fn body(a: &Alert) -> serde_json::Value {
    let mut alert = serde_json::json!({
        "labels": {
            "alertname": alertname(&a.rule),
            "rule": a.rule,
            "severity": a.severity,
            "node": a.node,
            "subject": a.subject,
            "breach_id": a.breach_id,
        },
        "annotations": {
            "summary": summary(a),
            "evidence": a.evidence.to_string(),
        },
        "startsAt": a.opened_at,
    });
    if a.state == "resolved"
        && let Some(obj) = alert.as_object_mut()
    {
        let ends = a.resolved_at.clone().unwrap_or_else(|| a.at.clone());
        obj.insert("endsAt".into(), serde_json::Value::String(ends));
    }
    serde_json::Value::Array(vec![alert])
}

#[async_trait::async_trait]
impl Sink for AlertmanagerSink {
    fn name(&self) -> &str {
        &self.name
    }
    fn accepts(&self, a: &Alert) -> bool {
        self.route.accepts(a)
    }
    async fn deliver(&self, a: &Alert) -> Result<(), DeliveryError> {
        let body =
            serde_json::to_vec(&body(a)).map_err(|e| DeliveryError::Encode(e.to_string()))?;
        self.endpoint.post_json(&body, &[]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alertname_is_prefixed_and_cleaned() {
        assert_eq!(alertname("foreign-egress"), "sovereign_foreign_egress");
    }
}
