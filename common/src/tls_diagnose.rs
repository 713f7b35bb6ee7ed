//! TLS failures in plain words, for operators: what `--check-config` finds in the
//! certificate files ([`check_files`]: validity dates, key match, chain to the configured CA),
//! why a handshake failed ([`explain`], [`plain_reason`]: "expired on <date>", "signed by
//! another CA", "name mismatch", "revoked"), a bare handshake that asks the collector why it
//! refuses us ([`probe`]), and a rate limit for logging refused handshakes
//! ([`FailureLog`]).
//!
//! rustls already knows each reason (`CertificateError`, the alert the peer sent); tonic and
//! hyper wrap it in "transport error" or "operation was canceled". This module digs it out of
//! the error chain (an `io::Error` hides its inner error from `source()`, so the chain is
//! walked through `get_ref` too) and words it.

use std::error::Error as StdError;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{AlertDescription, CertificateError, Error as TlsError};

use crate::config::Problems;

/// The three PEM files of one end of mutual TLS.
#[derive(Debug, Clone, Copy)]
pub struct CertFiles<'a> {
    /// The CA certificate(s) the certificate must chain to.
    pub ca: &'a Path,
    /// The certificate (and its intermediates).
    pub cert: &'a Path,
    /// Its private key.
    pub key: &'a Path,
}

/// Which end of mutual TLS a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A client certificate (an agent, a regulator): must chain to the CA with clientAuth.
    Client,
    /// A server certificate (the collector): must chain to the CA with serverAuth.
    Server,
}

/// `secs` since the epoch as RFC 3339 (UTC, seconds).
pub fn date(secs: u64) -> String {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok());
    match t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    }) {
        Some(s) => s,
        None => format!("{secs} s after 1970"),
    }
}

/// The reason of a rustls error in plain words, naming whose certificate it is (`whose`:
/// "this node's certificate", "the collector's certificate", "the client certificate").
pub fn plain_reason(err: &TlsError, whose: &str) -> String {
    match err {
        TlsError::InvalidCertificate(e) => certificate_reason(e, whose),
        TlsError::AlertReceived(alert) => alert_reason(*alert),
        TlsError::NoCertificatesPresented => {
            "no client certificate was presented (configure [tls] cert and key)".to_owned()
        }
        TlsError::InconsistentKeys(_) => format!("the key does not match {whose}"),
        other => format!("tls: {other}"),
    }
}

fn certificate_reason(e: &CertificateError, whose: &str) -> String {
    match e {
        CertificateError::Expired => format!("{whose} has expired"),
        CertificateError::ExpiredContext { time, not_after } => format!(
            "{whose} expired on {} (it is now {})",
            date(not_after.as_secs()),
            date(time.as_secs())
        ),
        CertificateError::NotValidYet => format!("{whose} is not valid yet"),
        CertificateError::NotValidYetContext { time, not_before } => format!(
            "{whose} is not valid before {} (it is now {}: check the clocks)",
            date(not_before.as_secs()),
            date(time.as_secs())
        ),
        CertificateError::UnknownIssuer => format!(
            "{whose} is signed by another CA (it does not chain to the configured CA certificate)"
        ),
        CertificateError::BadSignature => format!(
            "{whose} is signed by another CA (its signature does not verify with the configured CA's key)"
        ),
        CertificateError::NotValidForName => {
            format!("name mismatch: {whose} is not issued for the name asked for")
        }
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "name mismatch: {whose} is for {} but {} was asked for (set [tls] server_name or reissue with --san)",
            if presented.is_empty() {
                "no name".to_owned()
            } else {
                presented.join(", ")
            },
            expected.to_str()
        ),
        CertificateError::Revoked => format!("{whose} is revoked"),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!("{whose} is not issued for this use (client or server authentication)")
        }
        other => format!("{whose} is refused: {other:?}"),
    }
}

/// What the peer's alert says about our own certificate.
fn alert_reason(alert: AlertDescription) -> String {
    let what = match alert {
        AlertDescription::CertificateExpired => "expired (or not valid yet)",
        AlertDescription::UnknownCA => "signed by another CA than the one it trusts",
        AlertDescription::CertificateRevoked => "revoked (on its deny list)",
        AlertDescription::BadCertificate => "bad (malformed, wrong signature or a CA certificate)",
        AlertDescription::UnsupportedCertificate => "not issued for client authentication",
        AlertDescription::CertificateRequired => "missing: it requires one",
        AlertDescription::AccessDenied => "denied",
        // A CA of the same name but another key (two development CAs, a re-created CA): the
        // peer finds the issuer by name and the signature fails.
        AlertDescription::DecryptError => {
            "signed by another CA (one with the same name but another key), or made with a key that is not the certificate's: a signature did not verify"
        }
        other => return format!("the peer ended the handshake with the alert {other:?}"),
    };
    format!("the peer refused our certificate: {what}")
}

/// The rustls error somewhere in `err`'s chain, if any.
pub fn find_tls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a TlsError> {
    let mut cur: Option<&'a (dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<TlsError>() {
            return Some(t);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            if let Some(t) = inner.downcast_ref::<TlsError>() {
                return Some(t);
            }
            cur = inner.source();
            continue;
        }
        cur = e.source();
    }
    None
}

/// The TLS reason of `err` in plain words, when it is a TLS failure.
pub fn explain(err: &(dyn StdError + 'static), whose: &str) -> Option<String> {
    find_tls_error(err).map(|t| plain_reason(t, whose))
}

/// Read every certificate of a PEM file.
fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let all = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if all.is_empty() {
        return Err(format!("{}: holds no certificate", path.display()));
    }
    Ok(all)
}

/// Subject and validity of a DER certificate, in words.
fn describe(der: &[u8]) -> Option<(String, String, u64, u64)> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let v = c.validity();
    Some((
        c.subject().to_string(),
        c.issuer().to_string(),
        u64::try_from(v.not_before.timestamp()).unwrap_or(0),
        u64::try_from(v.not_after.timestamp()).unwrap_or(0),
    ))
}

/// Check a certificate, its key and its chain to the CA, as a handshake at `now` would, and
/// record every problem under `field.cert`, `field.key` (e.g. `tls.cert: … expired on …`).
/// With `notes`, a certificate that does not chain to the CA is noted there instead of being
/// a problem (a collector may hold a certificate from another CA than its clients').
pub fn check_files(
    problems: &mut Problems,
    notes: Option<&mut Vec<String>>,
    field: &str,
    files: CertFiles<'_>,
    side: Side,
    now: UnixTime,
) {
    let CertFiles { ca, cert, key } = files;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert_field = format!("{field}.cert");
    let ca_certs = match certs(ca) {
        Ok(c) => c,
        Err(e) => {
            problems.push(&format!("{field}.ca"), e);
            return;
        }
    };
    let chain = match certs(cert) {
        Ok(c) => c,
        Err(e) => {
            problems.push(&cert_field, e);
            return;
        }
    };
    let leaf = &chain[0];
    let whose = format!("the certificate {}", cert.display());
    if let Some((subject, issuer, not_before, not_after)) = describe(leaf.as_ref()) {
        let t = now.as_secs();
        if t > not_after {
            problems.push(
                &cert_field,
                format!(
                    "{whose} ({subject}) expired on {} (it is now {}): issue a new one",
                    date(not_after),
                    date(t)
                ),
            );
        } else if t < not_before {
            problems.push(
                &cert_field,
                format!(
                    "{whose} ({subject}) is not valid before {} (it is now {}: check the clock)",
                    date(not_before),
                    date(t)
                ),
            );
        }
        let mut roots = rustls::RootCertStore::empty();
        for c in &ca_certs {
            let _ = roots.add(c.clone());
        }
        let roots = Arc::new(roots);
        let verdict = match side {
            Side::Client => {
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| TlsError::General(e.to_string()))
                    .and_then(|v| v.verify_client_cert(leaf, &chain[1..], now).map(|_| ()))
            }
            Side::Server => {
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| TlsError::General(e.to_string()))
                    .and_then(|v| {
                        // Only the chain is checked here: the name clients ask for is theirs.
                        let name = x509_parser::parse_x509_certificate(leaf.as_ref())
                            .ok()
                            .and_then(|(_, c)| {
                                c.subject_alternative_name().ok().flatten().and_then(|s| {
                                    s.value.general_names.iter().find_map(|n| match n {
                                        x509_parser::extensions::GeneralName::DNSName(d) => {
                                            Some((*d).to_owned())
                                        }
                                        _ => None,
                                    })
                                })
                            })
                            .unwrap_or_else(|| "localhost".to_owned());
                        let name = ServerName::try_from(name)
                            .map_err(|e| TlsError::General(e.to_string()))?;
                        v.verify_server_cert(leaf, &chain[1..], &name, &[], now)
                            .map(|_| ())
                    })
            }
        };
        match verdict {
            Ok(()) => {}
            // Already said above, with the dates.
            Err(TlsError::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            )) => {}
            Err(TlsError::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            )) => {
                let ca_subjects: Vec<String> = ca_certs
                    .iter()
                    .filter_map(|c| describe(c.as_ref()).map(|d| d.0))
                    .collect();
                let text = format!(
                    "{whose} is signed by another CA: its issuer is {issuer}, {field}.ca {} holds {}",
                    ca.display(),
                    ca_subjects.join("; ")
                );
                match notes {
                    Some(n) => n.push(format!("{cert_field}: {text}")),
                    None => problems.push(&cert_field, text),
                }
            }
            Err(e) => problems.push(&cert_field, plain_reason(&e, &whose)),
        }
    } else {
        problems.push(
            &cert_field,
            format!("{}: not an X.509 certificate", cert.display()),
        );
    }
    let key_field = format!("{field}.key");
    match PrivateKeyDer::from_pem_file(key) {
        Err(e) => problems.push(
            &key_field,
            format!("{}: no private key: {e}", key.display()),
        ),
        Ok(k) => match rustls::sign::CertifiedKey::from_der(chain.clone(), k, &provider) {
            Ok(_) => {}
            Err(TlsError::InconsistentKeys(_)) => problems.push(
                &key_field,
                format!(
                    "{} does not match {} (the key of another certificate)",
                    key.display(),
                    cert.display()
                ),
            ),
            Err(e) => problems.push(&key_field, format!("{}: {e}", key.display())),
        },
    }
}

/// A bare TLS handshake with `addr` as a client (CA `ca`, our `cert` and `key`, verifying
/// `server_name`), then the HTTP/2 preface, to hear why the peer refuses us: `None` when it
/// answers (or cannot be reached at all: not a TLS matter), else the reason in plain words.
/// Bounded by `timeout`.
pub async fn probe(
    addr: &str,
    server_name: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
    timeout: Duration,
) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let attempt = async {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca)? {
            let _ = roots.add(c);
        }
        let chain = certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key: {e}"))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| plain_reason(&e, "this node's certificate"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| format!("server name {server_name:?}: {e}"))?;
        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
            // Not a TLS matter: the caller's own error says it.
            return Ok(());
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let words = |e: std::io::Error| {
            explain(&e, "the collector's certificate").unwrap_or_else(|| e.to_string())
        };
        let mut tls = connector.connect(name, tcp).await.map_err(words)?;
        let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        tls.write_all(&preface).await.map_err(words)?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await {
            Ok(0) => Err("the peer closed the connection after the handshake".to_owned()),
            Ok(_) => Ok(()),
            Err(e) => Err(words(e)),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => None,
        Ok(Err(reason)) => Some(reason),
        Err(_) => Some(format!("no TLS answer from {addr} within {timeout:?}")),
    }
}

/// A rate limit for log lines about refused handshakes: at most `max` per `window`; the
/// lines left out are counted and their number returned with the next line let through.
#[derive(Debug)]
pub struct FailureLog {
    max: u32,
    window: Duration,
    state: Mutex<(Instant, u32, u64)>,
}

impl FailureLog {
    /// At most `max` lines per `window`.
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(lines left out since the last one let through)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let Ok(mut s) = self.state.lock() else {
            return None;
        };
        let now = Instant::now();
        if now.duration_since(s.0) >= self.window {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 < self.max {
            s.1 += 1;
            let suppressed = s.2;
            s.2 = 0;
            Some(suppressed)
        } else {
            s.2 += 1;
            None
        }
    }
}

/// Most refused handshakes logged per minute by [`log_refused_handshake`].
pub const REFUSED_LOG_PER_MINUTE: u32 = 20;

/// The collector's log line for a refused handshake: the peer's address and the reason in
/// plain words, at most [`REFUSED_LOG_PER_MINUTE`] a minute (the others counted).
pub fn log_refused_handshake(listener: &str, peer: std::net::SocketAddr, err: &std::io::Error) {
    static LIMIT: std::sync::OnceLock<FailureLog> = std::sync::OnceLock::new();
    let limit =
        LIMIT.get_or_init(|| FailureLog::new(REFUSED_LOG_PER_MINUTE, Duration::from_secs(60)));
    let Some(left_out) = limit.allow() else {
        return;
    };
    let reason = explain(err, "the client certificate").unwrap_or_else(|| err.to_string());
    tracing::warn!(
        listener,
        peer.addr = %peer,
        reason = %reason,
        not_logged_before = left_out,
        "tls handshake refused: {reason}"
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reasons_are_plain_words_with_dates() {
        let e = TlsError::InvalidCertificate(CertificateError::ExpiredContext {
            time: UnixTime::since_unix_epoch(Duration::from_secs(1_800_000_000)),
            not_after: UnixTime::since_unix_epoch(Duration::from_secs(1_700_000_000)),
        });
        let r = plain_reason(&e, "this node's certificate");
        assert!(r.contains("expired on 2023-11-14T22:13:20Z"), "{r}");
        let r = plain_reason(
            &TlsError::InvalidCertificate(CertificateError::UnknownIssuer),
            "x",
        );
        assert!(r.contains("signed by another CA"), "{r}");
        let r = plain_reason(
            &TlsError::AlertReceived(AlertDescription::CertificateRevoked),
            "x",
        );
        assert!(r.contains("revoked"), "{r}");
    }

    #[test]
    fn a_tls_error_inside_an_io_error_is_found() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            TlsError::InvalidCertificate(CertificateError::Revoked),
        );
        assert!(explain(&io, "it").unwrap().contains("revoked"));
        assert!(explain(&std::io::Error::other("plain"), "it").is_none());
    }

    #[test]
    fn the_failure_log_lets_through_at_most_max_per_window_and_counts_the_rest() {
        let log = FailureLog::new(2, Duration::from_secs(3600));
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        let log = FailureLog::new(1, Duration::ZERO);
        assert_eq!(log.allow(), Some(0));
    }
}
