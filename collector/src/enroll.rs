//! Enrollment without copying keys: one-time tokens, certificate requests signed by the
//! collector's CA, and renewal over the agent's own mutual TLS identity.
//!
//! - `sov-collector enroll-token create --count N --expires D` ([`create_tokens`]) stores the
//!   sha256 of each new token (never the token itself) with its expiry, and prints the tokens
//!   and the CA's fingerprint ([`ca_fingerprint`], the agent's `--ca-sha256`).
//! - `sov-agent enroll` makes its key pair on the node and calls `Enroll.Enroll` with a token
//!   and a PKCS#10 request; [`EnrollService`] checks the request, spends the token (atomically
//!   in the store, so a token works once across replicas), and signs a certificate with role
//!   `agent` and the requested node name ([`Signer`]). The key never leaves the node.
//! - A running agent calls `Enroll.Renew` before its certificate expires; the node name comes
//!   from its current certificate, so a node can only renew itself.
//!
//! The collector signs only when `[enroll] ca_key` is configured; the CA certificate is the one
//! in `tls.ca` whose public key matches that key.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateSigningRequestParams, Issuer, KeyPair, PublicKeyData, SerialNumber};
use ring::rand::SecureRandom;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};
use serde::Deserialize;
use sov_proto::pb;
use time::OffsetDateTime;

use crate::auth::{self, Role};
use crate::pki::{self, PkiError};
use crate::store::{NewEnrollToken, Store, StoreError, TokenSpend};

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

/// Random bytes in one token (printed as 64 hex digits after [`TOKEN_PREFIX`]).
pub const TOKEN_BYTES: usize = 32;
/// Every token starts with this, so a leaked one is recognisable in logs and scanners.
pub const TOKEN_PREFIX: &str = "sovenroll-";
/// Most tokens one `enroll-token create` makes.
pub const MAX_TOKENS: u32 = 10_000;
/// Longest a token may stay valid.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// Largest certificate request accepted, bytes of DER.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Longest an enrolled certificate's validity is backdated (clock skew between machines);
/// shorter lifetimes are backdated by a tenth of themselves.
const MAX_BACKDATE: Duration = Duration::from_secs(3600);

/// Why an enrollment operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The CA key does not parse.
    #[error("{} is not a PEM private key", path.display())]
    CaKey {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// No certificate in the CA file belongs to the CA key.
    #[error("no certificate in {} matches the CA key {}", ca.display(), key.display())]
    NoMatchingCa {
        /// The CA certificate file (`tls.ca`).
        ca: PathBuf,
        /// The key file (`enroll.ca_key`).
        key: PathBuf,
    },
    /// A duration such as `--expires` is not understood.
    #[error("{value:?} is not a duration: {reason}")]
    BadDuration {
        /// What was given.
        value: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// `--count` out of range.
    #[error("count {0} is out of range 1..={MAX_TOKENS}")]
    BadCount(u32),
    /// A node name (`--replace`) is not allowed.
    #[error("node name: {0}")]
    NodeName(#[from] auth::AuthError),
    /// The system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// The certificate could not be made.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The store failed.
    #[error("store error")]
    Store(#[from] StoreError),
}

/// Lower-case hex sha256 of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// What the store keeps of a token: its sha256, lower-case hex.
pub fn hash_token(token: &str) -> String {
    sha256_hex(token.trim().as_bytes())
}

/// The fingerprint agents pin with `--ca-sha256`: the sha256 of the CA certificate's DER
/// encoding, lower-case hex (what `openssl x509 -in ca.pem -outform der | sha256sum` prints).
pub fn ca_fingerprint(der: &[u8]) -> String {
    sha256_hex(der)
}

/// A fresh token: [`TOKEN_PREFIX`] and [`TOKEN_BYTES`] random bytes in hex.
pub fn new_token() -> Result<String, EnrollError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| EnrollError::Random)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{TOKEN_PREFIX}{hex}"))
}

/// A duration written as a number and a unit: `90s`, `30m`, `24h`, `7d`.
pub fn parse_duration(value: &str) -> Result<Duration, EnrollError> {
    let bad = |reason| EnrollError::BadDuration {
        value: value.to_owned(),
        reason,
    };
    let v = value.trim();
    let split = v
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| bad("a unit is needed: s, m, h or d (e.g. 24h)"))?;
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| bad("it must start with a whole number"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => return Err(bad("the unit must be s, m, h or d")),
    }
    .ok_or_else(|| bad("too long"))?;
    if secs == 0 {
        return Err(bad("it must be longer than zero"));
    }
    Ok(Duration::from_secs(secs))
}

/// Make `count` tokens valid for `lifetime` from `now_unix_ms`, store their hashes, and
/// return them (the only time they are ever seen).
pub async fn create_tokens(
    store: &dyn Store,
    count: u32,
    lifetime: Duration,
    now_unix_ms: i64,
) -> Result<Vec<String>, EnrollError> {
    if !(1..=MAX_TOKENS).contains(&count) {
        return Err(EnrollError::BadCount(count));
    }
    if lifetime > MAX_TOKEN_LIFETIME {
        return Err(EnrollError::BadDuration {
            value: format!("{}s", lifetime.as_secs()),
            reason: "tokens may live at most 365 days",
        });
    }
    let expires = now_unix_ms.saturating_add(i64::try_from(lifetime.as_millis()).unwrap_or(0));
    let mut tokens = Vec::with_capacity(count as usize);
    let mut rows = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t = new_token()?;
        rows.push(NewEnrollToken {
            hash: hash_token(&t),
            created_unix_ms: now_unix_ms,
            expires_unix_ms: expires,
            replaces: None,
        });
        tokens.push(t);
    }
    store.add_enroll_tokens(&rows).await?;
    Ok(tokens)
}

/// Make one token that may enroll `node` although the name is in use (an operator's
/// decision to replace the node's certificate, logged loudly when spent): it enrolls `node`
/// only.
pub async fn create_replacement_token(
    store: &dyn Store,
    node: &str,
    lifetime: Duration,
    now_unix_ms: i64,
) -> Result<String, EnrollError> {
    auth::validate_name(node)?;
    if lifetime > MAX_TOKEN_LIFETIME {
        return Err(EnrollError::BadDuration {
            value: format!("{}s", lifetime.as_secs()),
            reason: "tokens may live at most 365 days",
        });
    }
    let expires = now_unix_ms.saturating_add(i64::try_from(lifetime.as_millis()).unwrap_or(0));
    let t = new_token()?;
    store
        .add_enroll_tokens(&[NewEnrollToken {
            hash: hash_token(&t),
            created_unix_ms: now_unix_ms,
            expires_unix_ms: expires,
            replaces: Some(node.to_owned()),
        }])
        .await?;
    Ok(t)
}

/// Every certificate in a PEM file, DER.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, EnrollError> {
    let bytes = std::fs::read(path).map_err(|source| EnrollError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect())
}

/// The fingerprint of the first certificate in the PEM file `ca` (for printing).
pub fn ca_file_fingerprint(ca: &Path) -> Result<String, EnrollError> {
    let certs = read_certs(ca)?;
    let first = certs.first().ok_or_else(|| EnrollError::Read {
        path: ca.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no PEM certificate"),
    })?;
    Ok(ca_fingerprint(first))
}

/// A certificate [`Signer::sign`] made.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Validity, Unix ms.
    pub not_before_unix_ms: i64,
    /// Validity, Unix ms.
    pub not_after_unix_ms: i64,
}

/// Why a certificate request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Larger than [`MAX_CSR_BYTES`].
    #[error("certificate request of {0} bytes exceeds {MAX_CSR_BYTES}")]
    TooLarge(usize),
    /// Not a PKCS#10 request, or its signature does not verify.
    #[error("not a valid PKCS#10 certificate request: {0}")]
    Invalid(rcgen::Error),
    /// The node name is not allowed.
    #[error(transparent)]
    Name(#[from] auth::AuthError),
    /// The certificate could not be made (a bug, not the caller's fault).
    #[error("cannot make the certificate: {0}")]
    Internal(String),
}

/// The collector's CA, ready to sign agent certificates.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_der: Vec<u8>,
    validity: Duration,
    trust_domain: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("ca_sha256", &ca_fingerprint(&self.ca_der))
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Load the CA key `key` and the certificate in `ca` that it belongs to.
    pub fn load(
        ca: &Path,
        key: &Path,
        validity: Duration,
        trust_domain: &str,
    ) -> Result<Self, EnrollError> {
        let key_pem = std::fs::read_to_string(key).map_err(|source| EnrollError::Read {
            path: key.to_path_buf(),
            source,
        })?;
        let pair = KeyPair::from_pem(&key_pem).map_err(|source| EnrollError::CaKey {
            path: key.to_path_buf(),
            source,
        })?;
        let spki = pair.subject_public_key_info();
        let ca_der = read_certs(ca)?
            .into_iter()
            .find(|der| {
                x509_parser::parse_x509_certificate(der)
                    .is_ok_and(|(_, c)| c.public_key().raw == spki.as_slice())
            })
            .ok_or_else(|| EnrollError::NoMatchingCa {
                ca: ca.to_path_buf(),
                key: key.to_path_buf(),
            })?;
        let issuer =
            Issuer::from_ca_cert_der(&ca_der, pair).map_err(|source| EnrollError::CaKey {
                path: ca.to_path_buf(),
                source,
            })?;
        let ca_pem = sov_common::tls::pem_certificate(&ca_der);
        Ok(Self {
            issuer,
            ca_pem,
            ca_der: ca_der.to_vec(),
            validity,
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// The CA certificate, PEM (what the collector adds to its TLS chain so that agents can
    /// pin it during enrollment).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Sign an agent certificate for `node` over the public key in `csr_der` (whose own
    /// signature must verify). Everything else in the request is ignored: the collector
    /// decides the subject, names, usages and lifetime.
    pub fn sign(
        &self,
        node: &str,
        csr_der: &[u8],
        now: OffsetDateTime,
    ) -> Result<Signed, RequestError> {
        if csr_der.len() > MAX_CSR_BYTES {
            return Err(RequestError::TooLarge(csr_der.len()));
        }
        auth::validate_name(node)?;
        let mut csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(RequestError::Invalid)?;
        let backdate = MAX_BACKDATE.min(self.validity / 10);
        let not_before = now - backdate;
        let not_after = now + self.validity;
        let mut params =
            pki::client_params(Role::Agent, node, &self.trust_domain, not_before, not_after)
                .map_err(|e| match e {
                    PkiError::Invalid(a) => RequestError::Name(a),
                    other => RequestError::Internal(other.to_string()),
                })?;
        params.serial_number = Some(random_serial());
        csr.params = params;
        let cert = csr.signed_by(&self.issuer).map_err(RequestError::Invalid)?;
        Ok(Signed {
            cert_pem: cert.pem(),
            not_before_unix_ms: unix_ms(not_before),
            not_after_unix_ms: unix_ms(not_after),
        })
    }
}

/// A random positive 16-byte serial number (RFC 5280 allows up to 20 bytes).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // Uniqueness then rests on the clock; still a valid serial.
        let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
        bytes.copy_from_slice(&nanos.to_be_bytes());
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// The `Enroll` gRPC service.
#[derive(Debug, Clone)]
pub struct EnrollService {
    store: Arc<dyn Store>,
    signer: Option<Arc<Signer>>,
    trust_domain: String,
}

impl EnrollService {
    /// Serve with `signer` (`None`: enrollment is off and every call says so).
    pub fn new(store: Arc<dyn Store>, signer: Option<Arc<Signer>>, trust_domain: String) -> Self {
        Self {
            store,
            signer,
            trust_domain,
        }
    }

    fn signer(&self) -> Result<&Signer, tonic::Status> {
        self.signer.as_deref().ok_or_else(|| {
            tonic::Status::failed_precondition(
                "enrollment is off on this collector: set [enroll] ca_key in its configuration",
            )
        })
    }

    fn respond(&self, signer: &Signer, signed: Signed) -> pb::EnrollResponse {
        pb::EnrollResponse {
            certificate_pem: signed.cert_pem,
            ca_pem: signer.ca_pem().to_owned(),
            not_before_unix_ms: signed.not_before_unix_ms,
            not_after_unix_ms: signed.not_after_unix_ms,
        }
    }
}

impl EnrollService {
    /// Refuse to enroll `node` when the name has a certificate in use (a report, or an
    /// enrollment, within one certificate lifetime), unless `token` was made by an operator to
    /// replace that node's certificate (`enroll-token create --replace NODE`): an enrollment
    /// token alone must never let its holder impersonate a live node. A replacement token
    /// enrolls its node only. Nothing is spent when refused.
    async fn refuse_a_name_in_use(
        &self,
        signer: &Signer,
        token: &str,
        node: &str,
        now_ms: i64,
    ) -> Result<(), tonic::Status> {
        let name = self
            .store
            .enroll_name_use(&hash_token(token), node)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot check an enrollment name");
                tonic::Status::unavailable("store unavailable; retry later")
            })?;
        let lifetime_ms = i64::try_from(signer.validity.as_millis()).unwrap_or(i64::MAX);
        let live = name
            .last_used_unix_ms
            .filter(|at| now_ms.saturating_sub(*at) < lifetime_ms);
        match (&name.token_replaces, live) {
            (Some(replaces), _) if replaces != node => {
                tracing::warn!(node, replaces = %replaces, "enrollment refused: replacement token for another node");
                Err(tonic::Status::permission_denied(format!(
                    "this token was made to replace node {replaces:?}'s certificate, not {node:?}'s"
                )))
            }
            (Some(_), Some(at)) => {
                tracing::warn!(
                    node,
                    last_used_ms = at,
                    "REPLACING THE CERTIFICATE OF A NODE IN USE: an operator's replacement token enrolls a new key for this name; add the old certificate to the [tls] revoked file if it was not retired"
                );
                Ok(())
            }
            (Some(_), None) | (None, None) => Ok(()),
            (None, Some(at)) => {
                tracing::warn!(
                    node,
                    last_used_ms = at,
                    "enrollment refused: the name has a certificate in use"
                );
                Err(tonic::Status::already_exists(format!(
                    "node {node:?} already has a certificate in use (last used at {at} ms); \
                     an enrollment token does not replace it: an operator can with \
                     `sov-collector enroll-token create --replace {node}`, or pick another name"
                )))
            }
        }
    }
}

fn refused(e: RequestError) -> tonic::Status {
    match e {
        RequestError::Internal(_) => {
            tracing::error!(error = %e, "enrollment failed");
            tonic::Status::internal(e.to_string())
        }
        _ => tonic::Status::invalid_argument(e.to_string()),
    }
}

#[tonic::async_trait]
impl pb::enroll_server::Enroll for EnrollService {
    async fn enroll(
        &self,
        request: tonic::Request<pb::EnrollRequest>,
    ) -> Result<tonic::Response<pb::EnrollResponse>, tonic::Status> {
        let signer = self.signer()?;
        let req = request.into_inner();
        let now = OffsetDateTime::now_utc();
        // Check the request before spending the token, so that a malformed request does not
        // waste it; sign after, so that no certificate exists for a refused token.
        auth::validate_name(&req.node)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        if req.csr_der.len() > MAX_CSR_BYTES {
            return Err(refused(RequestError::TooLarge(req.csr_der.len())));
        }
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            req.csr_der.as_slice(),
        ))
        .map_err(|e| refused(RequestError::Invalid(e)))?;
        self.refuse_a_name_in_use(signer, &req.token, &req.node, unix_ms(now))
            .await?;
        let spend = self
            .store
            .spend_enroll_token(&hash_token(&req.token), &req.node, unix_ms(now))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot check an enrollment token");
                tonic::Status::unavailable("store unavailable; retry later")
            })?;
        match spend {
            TokenSpend::Spent => {}
            TokenSpend::Unknown => {
                tracing::warn!(node = %req.node, "enrollment refused: unknown token");
                return Err(tonic::Status::unauthenticated(
                    "enrollment token unknown to this collector",
                ));
            }
            TokenSpend::AlreadyUsed { node, at_unix_ms } => {
                tracing::warn!(node = %req.node, spent_by = %node, "enrollment refused: token already used");
                return Err(tonic::Status::unauthenticated(format!(
                    "enrollment token already used (by node {node:?} at {at_unix_ms} ms); ask for a new one"
                )));
            }
            TokenSpend::Expired { at_unix_ms } => {
                tracing::warn!(node = %req.node, "enrollment refused: token expired");
                return Err(tonic::Status::unauthenticated(format!(
                    "enrollment token expired at {at_unix_ms} ms; ask for a new one"
                )));
            }
        }
        let signed = signer.sign(&req.node, &req.csr_der, now).map_err(refused)?;
        tracing::info!(node = %req.node, not_after_ms = signed.not_after_unix_ms, "node enrolled");
        Ok(tonic::Response::new(self.respond(signer, signed)))
    }

    async fn renew(
        &self,
        request: tonic::Request<pb::RenewRequest>,
    ) -> Result<tonic::Response<pb::EnrollResponse>, tonic::Status> {
        let id = auth::identity_from_request(&request, &self.trust_domain)?;
        auth::require_role(&id, &[Role::Agent], "Enroll.Renew")?;
        let signer = self.signer()?;
        let req = request.into_inner();
        let signed = signer
            .sign(&id.name, &req.csr_der, OffsetDateTime::now_utc())
            .map_err(refused)?;
        tracing::info!(node = %id.name, not_after_ms = signed.not_after_unix_ms, "certificate renewed");
        Ok(tonic::Response::new(self.respond(signer, signed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::DEFAULT_TRUST_DOMAIN as TD;

    fn csr(key: &KeyPair) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        // What the node asks for is ignored: it may not make itself an admin or a CA.
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://sovereign/admin/root".try_into().expect("uri"),
        )];
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.serialize_request(key).expect("csr").der().to_vec()
    }

    fn signer(validity: Duration) -> (tempfile::TempDir, Signer) {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = pki::init(dir.path(), &[], TD).expect("init");
        let s = Signer::load(&files.ca_cert, &files.ca_key, validity, TD).expect("signer");
        (dir, s)
    }

    #[test]
    fn a_signed_certificate_is_an_agent_certificate_for_the_node_and_the_requests_key() {
        let (dir, s) = signer(Duration::from_secs(600));
        let key = KeyPair::generate().expect("key");
        let now = OffsetDateTime::now_utc();
        let signed = s.sign("gpu-7", &csr(&key), now).expect("sign");
        let der = CertificateDer::from_pem_slice(signed.cert_pem.as_bytes()).expect("pem");
        let id = auth::identity_from_der(&der, TD).expect("identity");
        assert_eq!((id.role, id.name.as_str()), (Role::Agent, "gpu-7"));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        assert!(!cert.is_ca());
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(life, 660, "600 s plus a tenth backdated");
        // It chains to the CA.
        let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca");
        let ca_der = CertificateDer::from_pem_slice(&ca).expect("ca pem");
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).expect("ca");
        cert.verify_signature(Some(ca_cert.public_key()))
            .expect("signed by the CA");
        assert_eq!(s.ca_pem().trim(), String::from_utf8_lossy(&ca).trim());
    }

    #[test]
    fn two_certificates_for_one_key_have_different_serials() {
        let (_dir, s) = signer(Duration::from_secs(600));
        let key = KeyPair::generate().expect("key");
        let now = OffsetDateTime::now_utc();
        let serial = |pem: &str| {
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
            let (_, c) = x509_parser::parse_x509_certificate(&der).expect("parse");
            c.raw_serial().to_vec()
        };
        let a = s.sign("n", &csr(&key), now).expect("a").cert_pem;
        let b = s.sign("n", &csr(&key), now).expect("b").cert_pem;
        assert_ne!(serial(&a), serial(&b));
    }

    #[test]
    fn a_tampered_request_or_a_bad_name_is_refused() {
        let (_dir, s) = signer(Duration::from_secs(600));
        let key = KeyPair::generate().expect("key");
        let mut der = csr(&key);
        let last = der.len() - 1;
        der[last] ^= 0xff;
        let now = OffsetDateTime::now_utc();
        assert!(matches!(
            s.sign("n", &der, now),
            Err(RequestError::Invalid(_))
        ));
        assert!(matches!(
            s.sign("../etc", &csr(&key), now),
            Err(RequestError::Name(_))
        ));
        assert!(matches!(
            s.sign("n", &vec![0u8; MAX_CSR_BYTES + 1], now),
            Err(RequestError::TooLarge(_))
        ));
    }

    #[test]
    fn a_ca_key_that_belongs_to_no_certificate_in_the_ca_file_is_refused() {
        let (dir, _) = signer(Duration::from_secs(600));
        let other = tempfile::tempdir().expect("tempdir");
        let files = pki::init(other.path(), &[], TD).expect("init");
        let err = Signer::load(
            &dir.path().join("ca.pem"),
            &files.ca_key,
            Duration::ZERO,
            TD,
        )
        .expect_err("mismatch");
        assert!(matches!(err, EnrollError::NoMatchingCa { .. }), "{err:?}");
    }

    #[test]
    fn the_pem_of_the_ca_round_trips_to_the_same_der() {
        let (dir, s) = signer(Duration::from_secs(600));
        let der = read_certs(&dir.path().join("ca.pem")).expect("read");
        let again = CertificateDer::from_pem_slice(s.ca_pem().as_bytes()).expect("pem");
        assert_eq!(der[0].as_ref(), again.as_ref());
        assert_eq!(
            ca_file_fingerprint(&dir.path().join("ca.pem")).expect("fp"),
            ca_fingerprint(&der[0])
        );
    }

    #[test]
    fn durations_take_a_unit_and_refuse_zero_and_garbage() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        for bad in ["", "7", "d", "0h", "7w", "-1d", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_are_long_random_prefixed_and_hashed_for_storage() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 2 * TOKEN_BYTES);
        assert_eq!(hash_token(&a).len(), 64);
        assert_eq!(hash_token(&format!("{a}\n")), hash_token(&a));
        assert!(!hash_token(&a).contains(&a[TOKEN_PREFIX.len()..]));
    }

    #[tokio::test]
    async fn created_tokens_are_stored_only_as_hashes_and_counts_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open("", dir.path()).await.unwrap();
        let tokens = create_tokens(store.as_ref(), 3, Duration::from_secs(60), 1_000)
            .await
            .unwrap();
        assert_eq!(tokens.len(), 3);
        let spent = store
            .spend_enroll_token(&hash_token(&tokens[1]), "n", 2_000)
            .await
            .unwrap();
        assert_eq!(spent, TokenSpend::Spent);
        let raw = store
            .spend_enroll_token(&tokens[0], "n", 2_000)
            .await
            .unwrap();
        assert_eq!(raw, TokenSpend::Unknown, "the token itself is not stored");
        assert!(matches!(
            create_tokens(store.as_ref(), 0, Duration::from_secs(60), 0).await,
            Err(EnrollError::BadCount(0))
        ));
        assert!(
            create_tokens(store.as_ref(), 1, Duration::from_secs(366 * 86_400), 0)
                .await
                .is_err()
        );
    }
}
