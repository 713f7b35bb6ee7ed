//! The client side of mutual TLS over gRPC: the CA that signed the server, our certificate
//! and key, and one channel set-up with the project's timeouts (used by the agent's sender
//! and enrollment, and by `sovctl`).

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long one TCP + TLS connection attempt may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one RPC may take before the channel is considered broken.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A PEM file could not be read.
    #[error("cannot read {what} from {path}")]
    ReadPem {
        /// Which file this is (CA, certificate, key).
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A URL is not usable.
    #[error("bad collector URL {url:?}")]
    BadUrl {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// TCP or TLS failed.
    #[error("cannot connect to {url}")]
    Connect {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The client side of mutual TLS: the CA that signed the server, our certificate and key.
#[derive(Clone)]
pub struct ClientTls {
    ca: Certificate,
    identity: Option<Identity>,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Read one PEM file, naming `what` it is in the error.
pub fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::ReadPem {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// PEM text of one DER certificate.
pub fn pem_certificate(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            b64.push(if i <= chunk.len() {
                ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]
            } else {
                b'='
            });
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

impl ClientTls {
    /// Load PEM files.
    pub fn load(
        ca: &Path,
        cert: &Path,
        key: &Path,
        server_name: Option<String>,
    ) -> Result<Self, TransportError> {
        Ok(Self::from_pem_bytes(
            &read_pem("CA certificate", ca)?,
            &read_pem("certificate", cert)?,
            &read_pem("key", key)?,
            server_name,
        ))
    }

    /// Build from PEM bytes already read, verifying `server_name` when given.
    pub fn from_pem_bytes(ca: &[u8], cert: &[u8], key: &[u8], server_name: Option<String>) -> Self {
        Self {
            ca: Certificate::from_pem(ca),
            identity: Some(Identity::from_pem(cert, key)),
            server_name,
        }
    }

    /// Build from PEM text already in memory.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Self {
        Self::from_pem_bytes(ca.as_bytes(), cert.as_bytes(), key.as_bytes(), None)
    }

    /// Server verification only, no client certificate (the collector answers UNAUTHENTICATED).
    pub fn ca_only(ca: &str) -> Self {
        Self {
            ca: Certificate::from_pem(ca),
            identity: None,
            server_name: None,
        }
    }

    /// Verify this name in the collector's certificate instead of the URL's host.
    pub fn with_server_name(mut self, name: String) -> Self {
        self.server_name = Some(name);
        self
    }

    /// Connect to one URL (TCP, TLS handshake, HTTP/2) with the default timeouts.
    pub async fn connect(&self, url: &str) -> Result<Channel, TransportError> {
        let mut tls = ClientTlsConfig::new().ca_certificate(self.ca.clone());
        if let Some(identity) = &self.identity {
            tls = tls.identity(identity.clone());
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        let bad = |source| TransportError::BadUrl {
            url: url.to_owned(),
            source,
        };
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(bad)?
            .tls_config(tls)
            .map_err(bad)?
            .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
            .timeout(DEFAULT_RPC_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        endpoint
            .connect()
            .await
            .map_err(|source| TransportError::Connect {
                url: url.to_owned(),
                source,
            })
    }
}
