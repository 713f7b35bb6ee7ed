//! Generic webhook: the [`Alert`] as the JSON body, `X-Sovereign-Event: <state>`, and
//! `X-Sovereign-Signature: sha256=<hex HMAC-SHA256(secret, body)>` when a secret is set.

use super::config::WebhookSinkConfig;
use super::http::Endpoint;
use super::{Alert, DeliveryError, Route, Sink};

/// Header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "X-Sovereign-Signature";
/// Header carrying the alert's state.
pub const EVENT_HEADER: &str = "X-Sovereign-Event";

/// One `[[alert.webhook]]`.
pub struct WebhookSink {
    name: String,
    endpoint: Endpoint,
    key: Option<ring::hmac::Key>,
    route: Route,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field("signed", &self.key.is_some())
            .field("route", &self.route)
            .finish()
    }
}

impl WebhookSink {
    /// Build from its configuration.
    pub fn new(name: String, c: &WebhookSinkConfig) -> Result<Self, String> {
        Ok(Self {
            endpoint: Endpoint::new(&c.url, c.ca.as_deref()).map_err(|e| format!("{name}: {e}"))?,
            key: c
                .secret
                .as_ref()
                .map(|s| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s.as_bytes())),
            route: c.route().map_err(|e| format!("{name}: {e}"))?,
            name,
        })
    }
}

/// `sha256=<lower-case hex HMAC-SHA256(secret, body)>`, the signature header's value.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret), body)
}

fn sign(key: &ring::hmac::Key, body: &[u8]) -> String {
    let tag = ring::hmac::sign(key, body);
    let mut out = String::from("sha256=");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[async_trait::async_trait]
impl Sink for WebhookSink {
    fn name(&self) -> &str {
        &self.name
    }
    fn accepts(&self, a: &Alert) -> bool {
        self.route.accepts(a)
    }
    async fn deliver(&self, a: &Alert) -> Result<(), DeliveryError> {
        let body = serde_json::to_vec(a).map_err(|e| DeliveryError::Encode(e.to_string()))?;
        let mut headers = vec![(EVENT_HEADER, a.state.clone())];
        if let Some(key) = &self.key {
            headers.push((SIGNATURE_HEADER, sign(key, &body)));
        }
        self.endpoint.post_json(&body, &headers).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body_in_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cret");
        let sig = signature(b"s3cret", b"{}");
        let tag: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&sig[7 + 2 * i..9 + 2 * i], 16).unwrap())
            .collect();
        ring::hmac::verify(&key, b"{}", &tag).unwrap();
    }
}
