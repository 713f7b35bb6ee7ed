//! Enrollment and renewal, the node's side: the key pair is made here and never leaves.
//!
//! `sov-agent enroll` ([`enroll`]):
//! 1. makes an ECDSA P-256 key pair and a PKCS#10 request;
//! 2. learns the collector's CA without trusting the network: a TLS handshake whose verifier
//!    ([`PinnedCa`]) accepts the collector only if its chain holds a certificate whose sha256
//!    (of the DER) is the `--ca-sha256` given, and the collector's certificate verifies against
//!    it for the URL's name. Nothing secret is sent on that connection;
//! 3. over a normal TLS connection to that CA, sends the one-time token and the request;
//! 4. checks that the certificate returned certifies its own key, and writes the key (0600),
//!    the CA and the certificate (last: its presence means "enrolled") where `[tls]` says.
//!
//! A running agent renews its certificate ([`renew_due_at`], [`renew`]) at two thirds of its
//! lifetime over its current mutual TLS identity, with the same key, and the transport
//! ([`crate::transport::TlsSource`]) picks the new certificate up for its next connection.

use std::fs::{OpenOptions, Permissions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair, PublicKeyData};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use sov_proto::pb;

use crate::transport::{ClientTls, DEFAULT_CONNECT_TIMEOUT, TransportError};

/// Mode of the private key file.
const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
const CERT_MODE: u32 = 0o644;
/// Largest enrollment answer decoded.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Why enrollment or renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// `--ca-sha256` is not 64 hex digits.
    #[error("--ca-sha256 {0:?} is not a sha256 (64 hexadecimal digits)")]
    BadPin(String),
    /// The collector URL is unusable.
    #[error("bad collector URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// TCP failed while fetching the CA.
    #[error("cannot connect to {url}")]
    Connect {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The pinned handshake failed (wrong CA, wrong name, or not a collector).
    #[error("the collector at {url} is not the one pinned by --ca-sha256 {pin}: {reason}")]
    PinMismatch {
        /// The URL.
        url: String,
        /// The pin given.
        pin: String,
        /// What the handshake said.
        reason: String,
    },
    /// Building the TLS client or the channel failed.
    #[error("tls set-up failed")]
    Transport(#[from] TransportError),
    /// The collector refused.
    #[error("the collector refused: {code:?}: {message}")]
    Refused {
        /// gRPC status code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// Key or request generation failed.
    #[error("cannot {what}")]
    Key {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// The answer is not a certificate for our key.
    #[error("the collector's answer is unusable: {0}")]
    BadAnswer(String),
    /// A file could not be read or written.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The node already has a certificate.
    #[error(
        "{} already exists: this node is enrolled (move it aside to enroll again)",
        path.display()
    )]
    AlreadyEnrolled {
        /// The certificate file.
        path: PathBuf,
    },
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Normalise a `--ca-sha256` value: 64 hex digits, optionally with `sha256:` in front and
/// `:` between bytes (as `openssl x509 -fingerprint -sha256` prints it); any case.
pub fn parse_pin(value: &str) -> Result<String, EnrollError> {
    let v = value.trim();
    let v = v.strip_prefix("sha256:").unwrap_or(v);
    let hex: String = v.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(EnrollError::BadPin(value.to_owned()));
    }
    Ok(hex.to_ascii_lowercase())
}

/// PEM text of one DER certificate.
pub use sov_common::tls::pem_certificate;

/// A server certificate verifier that trusts only the CA whose DER has the pinned sha256, and
/// only if the server itself sends that CA in its chain (the collector does when enrollment is
/// on). It remembers the CA it verified against.
#[derive(Debug)]
pub struct PinnedCa {
    pin: String,
    provider: Arc<CryptoProvider>,
    found: Mutex<Option<CertificateDer<'static>>>,
}

impl PinnedCa {
    /// Trust the CA with this sha256 (lower-case hex, see [`parse_pin`]).
    pub fn new(pin: String) -> Self {
        Self {
            pin,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            found: Mutex::new(None),
        }
    }

    /// The CA the last successful handshake verified against.
    pub fn found(&self) -> Option<CertificateDer<'static>> {
        self.found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| sha256_hex(c.as_ref()) == self.pin)
        else {
            let seen: Vec<String> = intermediates
                .iter()
                .map(|c| sha256_hex(c.as_ref()))
                .collect();
            return Err(rustls::Error::General(format!(
                "no certificate in the collector's chain has that sha256 (chain CAs: {}); \
                 is [enroll] ca_key set on the collector?",
                if seen.is_empty() {
                    "none sent".to_owned()
                } else {
                    seen.join(", ")
                }
            )));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("the pinned CA is unusable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        *self
            .found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(ca.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Host and port of an `https://host:port` URL.
fn host_port(url: &str) -> Result<(String, u16), EnrollError> {
    let bad = |reason: &str| EnrollError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("must start with https://"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

/// The collector's CA, learned through a handshake pinned to `pin` (see [`PinnedCa`]).
pub async fn fetch_pinned_ca(
    url: &str,
    server_name: Option<&str>,
    pin: &str,
) -> Result<CertificateDer<'static>, EnrollError> {
    let (host, port) = host_port(url)?;
    let name = server_name.unwrap_or(&host).to_owned();
    let server_name = ServerName::try_from(name.clone()).map_err(|_| EnrollError::BadUrl {
        url: url.to_owned(),
        reason: format!("{name:?} is not a DNS name or IP address"),
    })?;
    let verifier = Arc::new(PinnedCa::new(pin.to_owned()));
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| EnrollError::PinMismatch {
        url: url.to_owned(),
        pin: pin.to_owned(),
        reason: e.to_string(),
    })?
    .dangerous()
    .with_custom_certificate_verifier(verifier.clone())
    .with_no_client_auth();
    let connect = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|source| EnrollError::Connect {
                url: url.to_owned(),
                source,
            })?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|e| EnrollError::PinMismatch {
                url: url.to_owned(),
                pin: pin.to_owned(),
                reason: e.to_string(),
            })?;
        // Nothing is sent: the handshake was all we wanted.
        drop(tls);
        Ok::<(), EnrollError>(())
    };
    tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| EnrollError::Connect {
            url: url.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
        })??;
    verifier.found().ok_or_else(|| EnrollError::PinMismatch {
        url: url.to_owned(),
        pin: pin.to_owned(),
        reason: "the handshake verified no CA".to_owned(),
    })
}

/// A certificate request for `key` (the collector decides everything in the certificate but
/// the key).
fn request(key: &KeyPair) -> Result<Vec<u8>, EnrollError> {
    let csr = CertificateParams::default()
        .serialize_request(key)
        .map_err(|source| EnrollError::Key {
            what: "make the certificate request",
            source,
        })?;
    Ok(csr.der().to_vec())
}

/// Check that `cert_pem` certifies `key` and return its DER.
fn check_answer(cert_pem: &str, key: &KeyPair) -> Result<CertificateDer<'static>, EnrollError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| EnrollError::BadAnswer(format!("not a PEM certificate ({e})")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| EnrollError::BadAnswer(format!("not a certificate ({e})")))?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(EnrollError::BadAnswer(
            "the certificate is for another key".to_owned(),
        ));
    }
    Ok(der)
}

fn refused(status: tonic::Status) -> EnrollError {
    EnrollError::Refused {
        code: status.code(),
        message: status.message().to_owned(),
    }
}

/// Where [`enroll`] writes, and what it says.
#[derive(Debug, Clone)]
pub struct EnrollFiles {
    /// CA certificate (`[tls] ca`).
    pub ca: PathBuf,
    /// This node's certificate (`[tls] cert`).
    pub cert: PathBuf,
    /// This node's private key (`[tls] key`).
    pub key: PathBuf,
}

/// What [`enroll`] got.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// When the certificate expires, Unix ms.
    pub not_after_unix_ms: i64,
}

/// Enroll `node` at the collector `url` with `token`, trusting the CA pinned by `pin`, and
/// write the key, CA and certificate to `files`.
pub async fn enroll(
    url: &str,
    server_name: Option<&str>,
    token: &str,
    pin: &str,
    node: &str,
    files: &EnrollFiles,
) -> Result<Enrolled, EnrollError> {
    let pin = parse_pin(pin)?;
    if files.cert.exists() {
        return Err(EnrollError::AlreadyEnrolled {
            path: files.cert.clone(),
        });
    }
    let ca = fetch_pinned_ca(url, server_name, &pin).await?;
    let ca_pem = pem_certificate(&ca);
    let key = KeyPair::generate().map_err(|source| EnrollError::Key {
        what: "generate the node key",
        source,
    })?;
    let csr_der = request(&key)?;
    let mut tls = ClientTls::ca_only(&ca_pem);
    if let Some(name) = server_name {
        tls = tls.with_server_name(name.to_owned());
    }
    let channel = tls.connect(url).await?;
    let mut client =
        pb::enroll_client::EnrollClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
    let answer = client
        .enroll(pb::EnrollRequest {
            token: token.trim().to_owned(),
            node: node.to_owned(),
            csr_der,
        })
        .await
        .map_err(refused)?
        .into_inner();
    check_answer(&answer.certificate_pem, &key)?;
    write_file(&files.key, key.serialize_pem().as_bytes(), KEY_MODE)?;
    write_file(&files.ca, ca_pem.as_bytes(), CERT_MODE)?;
    write_file(&files.cert, answer.certificate_pem.as_bytes(), CERT_MODE)?;
    Ok(Enrolled {
        not_after_unix_ms: answer.not_after_unix_ms,
    })
}

/// Validity of the PEM certificate in `cert_pem`: (not before, not after).
pub fn validity(cert_pem: &[u8]) -> Result<(SystemTime, SystemTime), String> {
    let der = CertificateDer::from_pem_slice(cert_pem).map_err(|e| e.to_string())?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}

/// When a certificate valid from `not_before` to `not_after` is renewed: at two thirds of
/// its lifetime.
pub fn renew_due_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life * 2 / 3
}

/// Ask the collectors at `urls`, in turn, for a new certificate for the key in `key_path`,
/// speaking as `tls` (the current certificate). Returns the new certificate, PEM, checked to
/// be for that key.
pub async fn renew(
    tls: &ClientTls,
    urls: &[String],
    key_path: &Path,
) -> Result<String, EnrollError> {
    let key_pem = std::fs::read_to_string(key_path).map_err(|source| EnrollError::Io {
        op: "read",
        path: key_path.to_path_buf(),
        source,
    })?;
    let key = KeyPair::from_pem(&key_pem).map_err(|source| EnrollError::Key {
        what: "load the node key",
        source,
    })?;
    let csr_der = request(&key)?;
    let mut last = None;
    for url in urls {
        let channel = match tls.connect(url).await {
            Ok(c) => c,
            Err(e) => {
                last = Some(EnrollError::Transport(e));
                continue;
            }
        };
        let mut client = pb::enroll_client::EnrollClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        match client
            .renew(pb::RenewRequest {
                csr_der: csr_der.clone(),
            })
            .await
        {
            Ok(answer) => {
                let pem = answer.into_inner().certificate_pem;
                check_answer(&pem, &key)?;
                return Ok(pem);
            }
            Err(status) => last = Some(refused(status)),
        }
    }
    Err(last.unwrap_or_else(|| EnrollError::BadUrl {
        url: String::new(),
        reason: "no collector URL".to_owned(),
    }))
}

/// Write `contents` to `path` with `mode`: a temporary file in the same directory created with
/// that mode, synced, renamed over `path`, and the directory synced. The directory is created
/// (0700) when missing.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), EnrollError> {
    let io = |op: &'static str, p: &Path| {
        let path = p.to_path_buf();
        move |source| EnrollError::Io { op, path, source }
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create directory", dir))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write", &tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_accept_openssl_forms_and_refuse_anything_else() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_pin(&hex).unwrap(), hex);
        assert_eq!(parse_pin(&hex.to_uppercase()).unwrap(), hex);
        assert_eq!(parse_pin(&format!("sha256:{hex}")).unwrap(), hex);
        let colons: Vec<&str> = std::iter::repeat_n("AB", 32).collect();
        assert_eq!(parse_pin(&colons.join(":")).unwrap(), hex);
        for bad in ["", "ab", &"zz".repeat(32), &"ab".repeat(33)] {
            assert!(parse_pin(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pem_encoding_round_trips_every_length_remainder() {
        for len in [1usize, 2, 3, 47, 48, 49, 700] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            let pem = pem_certificate(&der);
            assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).expect("parse");
            assert_eq!(back.as_ref(), der.as_slice(), "length {len}");
        }
    }

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime() {
        let nb = UNIX_EPOCH + Duration::from_secs(1_000);
        let na = nb + Duration::from_secs(300);
        assert_eq!(renew_due_at(nb, na), nb + Duration::from_secs(200));
        assert_eq!(
            renew_due_at(na, nb),
            na,
            "a reversed validity is due at once"
        );
    }

    #[test]
    fn urls_give_host_and_port_and_must_be_https() {
        assert_eq!(
            host_port("https://127.0.0.1:7443").unwrap(),
            ("127.0.0.1".to_owned(), 7443)
        );
        assert_eq!(host_port("https://[::1]:9").unwrap(), ("::1".to_owned(), 9));
        assert_eq!(host_port("https://c.example").unwrap().1, 443);
        assert!(host_port("http://c.example").is_err());
    }

    #[test]
    fn files_are_written_with_their_mode_in_a_new_private_directory() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("tls/node.key");
        write_file(&key, b"secret", KEY_MODE).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&dir.path().join("tls")), 0o700);
        write_file(&key, b"again", KEY_MODE).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"again");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tls")).unwrap().count(),
            1
        );
    }
}
