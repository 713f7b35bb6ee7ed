//! The collector's TLS front door, shared by the gRPC server and the HTTPS API.
//!
//! - [`ServerTls`]: the rustls server configuration built from `[tls]` (certificate, key, the
//!   CA client certificates must chain to, and the optional `revoked` deny list), rebuilt by
//!   [`ServerTls::reload_if_changed`] when any of those files changes, so a rotated collector
//!   certificate or a newly revoked client is in force for every new handshake without a
//!   restart (connections already open keep the certificate they were made with);
//! - [`DenyList`]: the `revoked` file, SHA-256 certificate fingerprints, serial numbers and
//!   SPIFFE ids; a client certificate on it fails the handshake with the
//!   `certificate_revoked` alert, and [`RevocationCheck`] refuses requests on connections
//!   opened before it was listed;
//! - [`incoming`]: the gRPC accept loop: at most `max_connections` connections at once
//!   (more are closed as soon as they are accepted), each TLS handshake finished within
//!   `tls_handshake_timeout_secs` or the connection is dropped (connections that never send,
//!   clients that send a byte a second).
//!
//! A configuration that fails to rebuild (a half-written key, a malformed deny list) is
//! logged and the previous one stays in force; at start the same failure is an error.

use std::future::Future as _;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use serde::Deserialize;

pub mod limits;

/// Default longest TLS handshake, seconds (`tls_handshake_timeout_secs`).
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS: u64 = 10;

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

/// How often the TLS files are checked for changes.
pub const TLS_RELOAD_EVERY: Duration = Duration::from_secs(2);
/// ALPN of the gRPC listener.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN of the HTTPS API.
pub const ALPN_HTTPS: &[&[u8]] = &[b"h2", b"http/1.1"];
/// Most entries read from a `revoked` file.
pub const MAX_REVOKED_ENTRIES: usize = 1_000_000;
/// Pause after a failed `accept` (out of file descriptors, for instance) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A line of the `revoked` file is neither a fingerprint nor a serial.
    #[error(
        "{path} line {line}: {reason} (expected 64 hex digits of a SHA-256 fingerprint, serial:HEX or id:spiffe://...)"
    )]
    Revoked {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration refused")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Lower-case hex without separators or leading zero digits (serials are compared this way).
fn normalize_hex(s: &str) -> String {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// Client certificates refused even though they chain to the CA: SHA-256 fingerprints of the
/// whole DER certificate, serial numbers (of certificates the collector CA issued), and SPIFFE
/// ids (every certificate naming that identity, including ones issued later by `Renew`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenyList {
    fingerprints: std::collections::HashSet<[u8; 32]>,
    serials: std::collections::HashSet<String>,
    ids: std::collections::HashSet<String>,
}

impl DenyList {
    /// Parse the `revoked` file format: one entry per line; `#` starts a comment; an entry is
    /// a SHA-256 fingerprint (64 hex digits, `:` separators allowed, as `openssl x509
    /// -fingerprint -sha256` prints after `=`), `serial:HEX` (colons allowed) or
    /// `id:spiffe://<trust-domain>/<role>/<name>`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, TlsError> {
        let mut list = Self::default();
        let bad = |line: usize, reason: String| TlsError::Revoked {
            path: path.display().to_string(),
            line,
            reason,
        };
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if list.len() >= MAX_REVOKED_ENTRIES {
                return Err(bad(
                    i + 1,
                    format!("more than {MAX_REVOKED_ENTRIES} entries"),
                ));
            }
            if let Some(id) = line.strip_prefix("id:") {
                let id = id.trim();
                if !id.starts_with(crate::auth::SPIFFE_SCHEME) || id.len() > 512 {
                    return Err(bad(i + 1, format!("bad id {id:?}: expected spiffe://...")));
                }
                list.ids.insert(id.to_owned());
                continue;
            }
            if let Some(serial) = line.strip_prefix("serial:") {
                let serial = serial.trim();
                if serial.is_empty()
                    || serial.len() > 128
                    || !serial.chars().all(|c| c.is_ascii_hexdigit() || c == ':')
                {
                    return Err(bad(i + 1, format!("bad serial {serial:?}")));
                }
                list.serials.insert(normalize_hex(serial));
                continue;
            }
            let hex: String = line.chars().filter(|c| *c != ':').collect();
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(i + 1, format!("bad entry {line:?}")));
            }
            let mut fp = [0u8; 32];
            for (k, byte) in fp.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&hex[2 * k..2 * k + 2], 16)
                    .map_err(|e| bad(i + 1, e.to_string()))?;
            }
            list.fingerprints.insert(fp);
        }
        Ok(list)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.fingerprints.len() + self.serials.len() + self.ids.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Why `der` is refused, if it is.
    pub fn refuses(&self, der: &[u8]) -> Option<&'static str> {
        if self.is_empty() {
            return None;
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        if self.fingerprints.contains(digest.as_ref()) {
            return Some("fingerprint");
        }
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return None;
        };
        if !self.serials.is_empty()
            && self
                .serials
                .contains(&normalize_hex(&cert.tbs_certificate.raw_serial_as_string()))
        {
            return Some("serial");
        }
        if !self.ids.is_empty()
            && let Ok(Some(sans)) = cert.subject_alternative_name()
            && sans.value.general_names.iter().any(|gn| {
                matches!(gn, x509_parser::extensions::GeneralName::URI(uri) if self.ids.contains(*uri))
            })
        {
            return Some("id");
        }
        None
    }
}

/// The lower-case hex SHA-256 fingerprint of a DER certificate (the `revoked` file format).
pub fn fingerprint_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The web PKI client verifier, then the deny list.
#[derive(Debug)]
struct DenyingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    deny: Arc<DenyList>,
}

impl ClientCertVerifier for DenyingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(by) = self.deny.refuses(end_entity.as_ref()) {
            tracing::warn!(
                by,
                fingerprint = %fingerprint_hex(end_entity.as_ref()),
                "revoked client certificate refused"
            );
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The bytes of every file the configuration is built from, compared to notice changes.
#[derive(Debug, PartialEq, Eq)]
struct Sources {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    revoked: Option<Vec<u8>>,
}

impl Sources {
    fn read(files: &ServerTlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            ca: read(&files.ca)?,
            cert: read(&files.cert)?,
            key: read(&files.key)?,
            revoked: files.revoked.as_deref().map(read).transpose()?,
        })
    }
}

/// What one set of files built.
#[derive(Debug)]
struct Built {
    sources: Sources,
    config: Arc<rustls::ServerConfig>,
    deny: Arc<DenyList>,
}

/// A rustls server configuration that follows its files (see the module documentation).
#[derive(Debug)]
pub struct ServerTls {
    files: ServerTlsFiles,
    alpn: Vec<Vec<u8>>,
    extra_chain: Vec<CertificateDer<'static>>,
    state: RwLock<Built>,
}

impl ServerTls {
    /// Build from `files`, announcing `alpn`; `extra_chain` (PEM, may be empty) is sent after
    /// the collector's own certificate chain (the enrollment CA, which enrolling agents pin).
    pub fn load(
        files: &ServerTlsFiles,
        alpn: &[&[u8]],
        extra_chain: &str,
    ) -> Result<Self, TlsError> {
        let extra_chain = CertificateDer::pem_slice_iter(extra_chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                path: "enrollment CA".into(),
                reason: e.to_string(),
            })?;
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|a| a.to_vec()).collect();
        let sources = Sources::read(files)?;
        let built = build(files, sources, &alpn, &extra_chain)?;
        Ok(Self {
            files: files.clone(),
            alpn,
            extra_chain,
            state: RwLock::new(built),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Built) -> T) -> T {
        match self.state.read() {
            Ok(s) => f(&s),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.with(|b| b.config.clone())
    }

    /// Why the certificate `der` is refused by the deny list in force now, if it is (checked
    /// on every request too, so that revoking a node cuts the connection it already has).
    pub fn revoked(&self, der: &[u8]) -> Option<&'static str> {
        self.with(|b| b.deny.refuses(der))
    }

    /// Re-read the files; rebuild when any changed. `Ok(true)` when a new configuration is in
    /// force; on an error the previous one stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let sources = Sources::read(&self.files)?;
        if self.with(|b| b.sources == sources) {
            return Ok(false);
        }
        let built = build(&self.files, sources, &self.alpn, &self.extra_chain)?;
        let mut state = match self.state.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        *state = built;
        Ok(true)
    }
}

/// Check the files every [`TLS_RELOAD_EVERY`] until `stop`.
pub async fn reload_loop(tls: Arc<ServerTls>, what: &'static str, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TLS_RELOAD_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let t = tls.clone();
        match tokio::task::spawn_blocking(move || t.reload_if_changed()).await {
            Ok(Ok(true)) => tracing::info!(
                listener = what,
                "tls certificate, CA or revocation list reloaded"
            ),
            Ok(Ok(false)) | Err(_) => {}
            Ok(Err(err)) => {
                tracing::warn!(listener = what, error = %err, "tls files changed but cannot be loaded; the previous ones stay in force");
            }
        }
    }
}

fn build(
    files: &ServerTlsFiles,
    sources: Sources,
    alpn: &[Vec<u8>],
    extra_chain: &[CertificateDer<'static>],
) -> Result<Built, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pem_err = |path: &Path, reason: String| TlsError::Pem {
        path: path.display().to_string(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&sources.ca) {
        let cert = cert.map_err(|e| pem_err(&files.ca, e.to_string()))?;
        roots.add(cert)?;
    }
    let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    // A missing certificate is answered by the services (UNAUTHENTICATED, HTTP 401: clearer
    // than a failed handshake); a certificate that does not verify fails the handshake.
    .allow_unauthenticated()
    .build()?;
    let deny = Arc::new(match (&files.revoked, &sources.revoked) {
        (Some(path), Some(bytes)) => DenyList::parse(path, &String::from_utf8_lossy(bytes))?,
        _ => DenyList::default(),
    });
    let verifier = Arc::new(DenyingVerifier {
        inner: webpki,
        deny: deny.clone(),
    });
    let mut certs = CertificateDer::pem_slice_iter(&sources.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(&files.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err(&files.cert, "no certificate".into()));
    }
    certs.extend(extra_chain.iter().cloned());
    let key = PrivateKeyDer::from_pem_slice(&sources.key)
        .map_err(|e| pem_err(&files.key, e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = alpn.to_vec();
    Ok(Built {
        sources,
        config: Arc::new(cfg),
        deny,
    })
}

/// A tower layer's service for the gRPC router: a request whose connection's client
/// certificate is on the deny list in force now is answered PERMISSION_DENIED (the handshake
/// refuses revoked certificates; this cuts connections opened before the revocation).
#[derive(Debug, Clone)]
pub struct RevocationCheck<S> {
    inner: S,
    tls: Arc<ServerTls>,
}

impl<S> RevocationCheck<S> {
    /// Wrap `inner`.
    pub fn new(inner: S, tls: Arc<ServerTls>) -> Self {
        Self { inner, tls }
    }
}

impl<S, B> tower::Service<tonic::codegen::http::Request<B>> for RevocationCheck<S>
where
    S: tower::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
        >,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let certs = req
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|i| i.peer_certs());
        if let Some(leaf) = certs.as_ref().and_then(|c| c.first())
            && let Some(by) = self.tls.revoked(leaf.as_ref())
        {
            tracing::warn!(
                by,
                "request on a connection whose client certificate was revoked"
            );
            let status = tonic::Status::permission_denied(format!(
                "client certificate revoked (by {by} in the collector's deny list)"
            ));
            let resp = status.into_http();
            return Box::pin(async move { Ok(resp) });
        }
        Box::pin(self.inner.call(req))
    }
}

/// Limits of the gRPC accept loop.
#[derive(Debug, Clone)]
pub struct AcceptLimits {
    /// Most connections open at once (handshaking or established).
    pub max_connections: usize,
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Most connections open at once from one source address.
    pub per_address: limits::PerAddress,
    /// Longest a connection without a client certificate stays open.
    pub anonymous_lifetime: Duration,
}

/// One accepted, handshaken gRPC connection; holds its slot under `max_connections` and its
/// address's place until it is closed. A connection without a client certificate ends at its
/// deadline (it can only enroll, which is one call).
#[derive(Debug)]
pub struct Conn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    _slot: Slot,
    _address: limits::AddressSlot,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A place under `max_connections`, counted in the open-connections gauge until dropped.
#[derive(Debug)]
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Slot {
    fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        metrics.connection(true);
        Self {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.connection(false);
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = <tokio_rustls::server::TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(d) = self.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection without a client certificate reached its lifetime",
            )));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accept on `listener` until `stop`, handshaking each connection on its own task under
/// `limits`; the handshaken connections come out of the returned stream (for
/// `serve_with_incoming_shutdown`).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    limits: AcceptLimits,
    metrics: Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<Conn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(accept_loop(listener, tls, limits, metrics, tx, stop));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    limits: AcceptLimits,
    metrics: Arc<crate::metrics::Metrics>,
    tx: tokio::sync::mpsc::Sender<Result<Conn, io::Error>>,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut shed: u64 = 0;
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(error = %err, "grpc accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                        () = stop.cancelled() => return,
                    }
                }
            },
            () = stop.cancelled() => return,
        };
        let Some(address) = limits.per_address.take(addr.ip()) else {
            metrics.connection_refused();
            shed += 1;
            if shed.is_power_of_two() {
                tracing::warn!(
                    peer.addr = %addr,
                    max_connections_per_address = limits.per_address.limit(),
                    refused_so_far = shed,
                    "connection limit of one address reached; connection closed"
                );
            }
            drop(tcp);
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // At the limit: close at once rather than let the kernel queue grow.
            metrics.connection_refused();
            shed += 1;
            if shed.is_power_of_two() {
                tracing::warn!(
                    peer.addr = %addr,
                    max_connections = limits.max_connections,
                    refused_so_far = shed,
                    "connection limit reached; connection closed"
                );
            }
            drop(tcp);
            continue;
        };
        // tonic sets TCP_NODELAY only on listeners it binds itself; without it an ack can
        // wait for the peer's delayed ACK (about 40 ms, measured in bench_ingest's p99).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let slot = Slot::new(permit, metrics.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let tx = tx.clone();
        let stop = stop.clone();
        let metrics = metrics.clone();
        let (handshake_timeout, anonymous_lifetime) =
            (limits.handshake_timeout, limits.anonymous_lifetime);
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp));
            let stream = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(err)) => {
                        metrics.handshake_failed(false);
                        sov_common::tls_diagnose::log_refused_handshake("grpc", addr, &err);
                        return;
                    }
                    Err(_) => {
                        metrics.handshake_failed(true);
                        tracing::debug!(peer.addr = %addr, "tls handshake timed out");
                        return;
                    }
                },
                () = stop.cancelled() => return,
            };
            let anonymous = stream.get_ref().1.peer_certificates().is_none();
            let _ = tx
                .send(Ok(Conn {
                    inner: stream,
                    _slot: slot,
                    _address: address,
                    deadline: anonymous.then(|| Box::pin(tokio::time::sleep(anonymous_lifetime))),
                }))
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deny_list_reads_fingerprints_with_or_without_colons_serials_and_comments() {
        let fp = "ab".repeat(32);
        let colons = (0..32).map(|_| "CD").collect::<Vec<_>>().join(":");
        let text = format!(
            "# revoked\n{fp}\n\n{colons}  # stolen laptop\nserial:00:1F\nid:spiffe://sovereign/agent/n9\n"
        );
        let list = DenyList::parse(Path::new("r"), &text).expect("parse");
        assert_eq!(list.len(), 4);
        assert!(list.ids.contains("spiffe://sovereign/agent/n9"));
        assert!(list.serials.contains("1f"));
        assert!(list.fingerprints.contains(&[0xcd; 32]));
    }

    #[test]
    fn a_malformed_deny_list_line_is_refused_naming_the_line() {
        for bad in ["abc", "serial:", "serial:xyz", "id:n1", &"a".repeat(63)] {
            let err = DenyList::parse(Path::new("revoked.txt"), &format!("# ok\n{bad}\n"))
                .expect_err(bad);
            let msg = err.to_string();
            assert!(msg.contains("revoked.txt line 2"), "{msg}");
        }
    }

    #[test]
    fn a_certificate_is_refused_by_its_fingerprint_or_its_serial_and_others_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::pki::init(dir.path(), &[], "sovereign").expect("init");
        let pair = crate::pki::issue(dir.path(), crate::auth::Role::Agent, "n1", "sovereign")
            .expect("issue");
        let pem = std::fs::read(pair.cert).expect("read");
        let der = CertificateDer::from_pem_slice(&pem).expect("pem").to_vec();
        let other = crate::pki::issue(dir.path(), crate::auth::Role::Agent, "n2", "sovereign")
            .expect("issue");
        let other_der = CertificateDer::from_pem_slice(&std::fs::read(other.cert).expect("read"))
            .expect("pem")
            .to_vec();

        let by_fp = DenyList::parse(Path::new("r"), &fingerprint_hex(&der)).expect("parse");
        assert_eq!(by_fp.refuses(&der), Some("fingerprint"));
        assert_eq!(by_fp.refuses(&other_der), None);

        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
        let serial = cert.tbs_certificate.raw_serial_as_string().to_uppercase();
        let by_serial =
            DenyList::parse(Path::new("r"), &format!("serial:{serial}")).expect("parse");
        assert_eq!(by_serial.refuses(&der), Some("serial"));
        assert_eq!(by_serial.refuses(&other_der), None);

        let by_id =
            DenyList::parse(Path::new("r"), "id:spiffe://sovereign/agent/n1").expect("parse");
        assert_eq!(by_id.refuses(&der), Some("id"));
        assert_eq!(by_id.refuses(&other_der), None);
        assert_eq!(DenyList::default().refuses(&der), None);
    }
}
