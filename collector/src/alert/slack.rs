//! Slack incoming webhook: `{"text": "[CRITICAL] foreign-egress OPEN on node-a: ..."}`.

use super::config::SlackSinkConfig;
use super::http::Endpoint;
use super::{Alert, DeliveryError, Route, Sink, summary};

/// One `[[alert.slack]]`.
#[derive(Debug)]
pub struct SlackSink {
    name: String,
    endpoint: Endpoint,
    route: Route,
}

impl SlackSink {
    /// Build from its configuration.
    pub fn new(name: String, c: &SlackSinkConfig) -> Result<Self, String> {
        Ok(Self {
            endpoint: Endpoint::new(&c.url, c.ca.as_deref()).map_err(|e| format!("{name}: {e}"))?,
            route: c.route().map_err(|e| format!("{name}: {e}"))?,
            name,
        })
    }
}

/// The message: the summary line, then the breach id and time.
pub fn text(a: &Alert) -> String {
    format!("{}\nbreach {} at {}", summary(a), a.breach_id, a.at)
}

#[async_trait::async_trait]
impl Sink for SlackSink {
    fn name(&self) -> &str {
        &self.name
    }
    fn accepts(&self, a: &Alert) -> bool {
        self.route.accepts(a)
    }
    async fn deliver(&self, a: &Alert) -> Result<(), DeliveryError> {
        let body = serde_json::to_vec(&serde_json::json!({ "text": text(a) }))
            .map_err(|e| DeliveryError::Encode(e.to_string()))?;
        self.endpoint.post_json(&body, &[]).await
    }
}
