//! Peer certificate → [`Identity`].
//!
//! Identity comes from the client certificate, never from the message body. The leaf
//! certificate presented over mutual TLS must carry exactly one SPIFFE-style URI SAN in the
//! collector's trust domain:
//!
//! ```text
//! spiffe://<trust-domain>/<role>/<name>        e.g. spiffe://sovereign/agent/gpu-node-17
//! ```
//!
//! - [`identity_from_der`] parses one DER certificate into an [`Identity`] or an [`AuthError`].
//! - [`identity_from_request`] does the same for the peer of a tonic request and converts the
//!   failure into a `tonic::Status` (UNAUTHENTICATED without a certificate, PERMISSION_DENIED
//!   with a certificate whose identity is refused).
//! - [`require_role`] is the per-RPC authorisation check.
//! - [`validate_name`] and [`validate_trust_domain`] are the syntax rules shared with `pki`
//!   (a name is also a file name there, so it can never contain a path separator).

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;

use crate::error::ApiError;

/// The trust domain used when the configuration names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "sovereign";

/// URI scheme prefix of a SPIFFE id.
/// The URI scheme of SPIFFE ids.
pub const SPIFFE_SCHEME: &str = "spiffe://";

/// Longest accepted node / principal name, in bytes (names are ASCII).
const MAX_NAME_LEN: usize = 128;

/// Longest accepted trust domain, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// What a certificate holder may do. Carried in the certificate's SPIFFE id path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A node agent: may send reports about itself.
    Agent,
    /// A regulator: may query.
    Regulator,
    /// An operator of the collector: may query and administer.
    Admin,
}

impl Role {
    /// Every role, in the order used in messages.
    pub const ALL: [Role; 3] = [Role::Agent, Role::Regulator, Role::Admin];

    /// The role's path segment in a SPIFFE id (`agent`, `regulator`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Regulator => "regulator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| AuthError::UnknownRole { role: s.to_owned() })
    }
}

/// Who is on the other end of a connection, as proven by its client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The node or principal name (for agents, the node name).
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// Why a certificate (or a name) does not yield an identity.
#[derive(thiserror::Error, Debug)]
pub enum AuthError {
    /// The bytes are not a DER X.509 certificate.
    #[error("certificate could not be parsed")]
    Parse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The subject alternative name extension is malformed.
    #[error("certificate subject alternative names could not be parsed")]
    SanParse(#[source] x509_parser::error::X509Error),
    /// No `spiffe://` URI SAN at all.
    #[error("certificate has no spiffe:// URI subject alternative name")]
    MissingSpiffeId,
    /// SPIFFE ids exist, but none in our trust domain.
    #[error("spiffe id {found} is not in trust domain {expected:?}")]
    WrongTrustDomain {
        /// The (first) SPIFFE id found.
        found: String,
        /// The trust domain the collector accepts.
        expected: String,
    },
    /// More than one SPIFFE id in our trust domain: ambiguous, refused.
    #[error(
        "certificate has {count} spiffe ids in trust domain {trust_domain:?}; exactly one is required"
    )]
    MultipleSpiffeIds {
        /// How many matched.
        count: usize,
        /// The trust domain they matched.
        trust_domain: String,
    },
    /// The SPIFFE id path is not `/<role>/<name>`.
    #[error("malformed spiffe id {uri}: expected spiffe://<trust-domain>/<role>/<name>")]
    MalformedSpiffeId {
        /// The offending URI.
        uri: String,
    },
    /// The role segment names no known role.
    #[error("unknown role {role:?} (valid roles: agent, regulator, admin)")]
    UnknownRole {
        /// The role segment as found.
        role: String,
    },
    /// The name segment (or a name given to `pki`) breaks the naming rules.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name as found.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A trust domain breaks the syntax rules.
    #[error("invalid trust domain {trust_domain:?}: {reason}")]
    InvalidTrustDomain {
        /// The trust domain as given.
        trust_domain: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
}

/// Check a node / principal name: 1 to 128 characters of `[A-Za-z0-9._-]`, not starting with
/// `.` or `-`. Names are used as file names by `pki`, so this also rules out path traversal.
pub fn validate_name(name: &str) -> Result<(), AuthError> {
    let bad = |reason| {
        Err(AuthError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 128 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    if name.starts_with(['.', '-']) {
        return bad("must not start with '.' or '-'");
    }
    Ok(())
}

/// Check a SPIFFE trust domain: 1 to 255 characters of `[a-z0-9._-]`.
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), AuthError> {
    let bad = |reason| {
        Err(AuthError::InvalidTrustDomain {
            trust_domain: trust_domain.to_owned(),
            reason,
        })
    };
    if trust_domain.is_empty() {
        return bad("must not be empty");
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return bad("longer than 255 characters");
    }
    if !trust_domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only lowercase letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// The SPIFFE id for `role`/`name` in `trust_domain`, as written into certificates.
pub fn spiffe_id(trust_domain: &str, role: Role, name: &str) -> String {
    format!("{SPIFFE_SCHEME}{trust_domain}/{role}/{name}")
}

/// The identity carried by a DER-encoded leaf certificate.
///
/// Exactly one `spiffe://` URI SAN must be in `trust_domain`; its path must be
/// `/<role>/<name>` with a known role and a valid name. The certificate chain is *not*
/// verified here: that is the TLS layer's job (the server's client CA roots).
pub fn identity_from_der(der: &[u8], trust_domain: &str) -> Result<Identity, AuthError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(AuthError::Parse)?;
    let sans = cert
        .subject_alternative_name()
        .map_err(AuthError::SanParse)?;

    let spiffe_uris: Vec<&str> = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|gn| match gn {
            GeneralName::URI(uri) if uri.starts_with(SPIFFE_SCHEME) => Some(*uri),
            _ => None,
        })
        .collect();

    let Some(&first) = spiffe_uris.first() else {
        return Err(AuthError::MissingSpiffeId);
    };

    let domain_prefix = format!("{SPIFFE_SCHEME}{trust_domain}/");
    let ours: Vec<&str> = spiffe_uris
        .iter()
        .copied()
        .filter(|uri| uri.starts_with(&domain_prefix))
        .collect();

    let uri = match ours.as_slice() {
        [] => {
            return Err(AuthError::WrongTrustDomain {
                found: first.to_owned(),
                expected: trust_domain.to_owned(),
            });
        }
        [one] => *one,
        many => {
            return Err(AuthError::MultipleSpiffeIds {
                count: many.len(),
                trust_domain: trust_domain.to_owned(),
            });
        }
    };

    let path = &uri[domain_prefix.len()..];
    let malformed = || AuthError::MalformedSpiffeId {
        uri: uri.to_owned(),
    };
    let (role, name) = path.split_once('/').ok_or_else(malformed)?;
    if name.contains('/') || name.contains(['?', '#']) {
        return Err(malformed());
    }
    let role: Role = role.parse()?;
    validate_name(name)?;
    Ok(Identity {
        name: name.to_owned(),
        role,
    })
}

/// The identity of the peer of a tonic request, from its TLS client certificate.
///
/// No certificate → `UNAUTHENTICATED`; a certificate whose identity is refused →
/// `PERMISSION_DENIED` with the reason.
pub fn identity_from_request<T>(
    req: &tonic::Request<T>,
    trust_domain: &str,
) -> Result<Identity, ApiError> {
    let certs = req.peer_certs();
    let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
        return Err(ApiError::unauthenticated(
            "client certificate required: connect with mutual TLS using a certificate issued by the collector CA",
        ));
    };
    identity_from_der(leaf.as_ref(), trust_domain)
        .map_err(|err| ApiError::permission_denied(format!("client certificate refused: {err}")))
}

/// Allow the call `what` only if `id`'s role is one of `allowed`.
pub fn require_role(id: &Identity, allowed: &[Role], what: &str) -> Result<(), ApiError> {
    if allowed.contains(&id.role) {
        return Ok(());
    }
    let allowed: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
    Err(ApiError::permission_denied(format!(
        "role {} (name {:?}) may not call {what}; allowed roles: {}",
        id.role,
        id.name,
        if allowed.is_empty() {
            "none".to_owned()
        } else {
            allowed.join(", ")
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    fn pem_to_der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("pem")
            .to_vec()
    }

    /// A self-signed certificate carrying exactly these URI SANs.
    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().expect("ia5")))
            .collect();
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("sign").der().to_vec()
    }

    fn issued(role: Role, name: &str, td: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init(dir.path(), &[], td).expect("init");
        let pair = pki::issue(dir.path(), role, name, td).expect("issue");
        pem_to_der(&std::fs::read_to_string(pair.cert).expect("read"))
    }

    #[test]
    fn an_issued_agent_certificate_yields_its_name_and_the_agent_role() {
        let der = issued(Role::Agent, "gpu-node-17", DEFAULT_TRUST_DOMAIN);
        let id = identity_from_der(&der, DEFAULT_TRUST_DOMAIN).expect("identity");
        assert_eq!(
            id,
            Identity {
                name: "gpu-node-17".into(),
                role: Role::Agent
            }
        );
    }

    #[test]
    fn an_issued_regulator_certificate_yields_the_regulator_role() {
        let der = issued(Role::Regulator, "anrt.ma", "example.org");
        let id = identity_from_der(&der, "example.org").expect("identity");
        assert_eq!(id.name, "anrt.ma");
        assert_eq!(id.role, Role::Regulator);
    }

    #[test]
    fn a_certificate_from_another_trust_domain_is_refused_naming_both() {
        let der = issued(Role::Agent, "n1", "other");
        let err = identity_from_der(&der, DEFAULT_TRUST_DOMAIN).expect_err("must refuse");
        assert!(matches!(err, AuthError::WrongTrustDomain { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("spiffe://other/agent/n1"), "{msg}");
        assert!(msg.contains("\"sovereign\""), "{msg}");
    }

    #[test]
    fn a_trust_domain_that_is_a_prefix_of_ours_is_not_ours() {
        let der = cert_with_uris(&["spiffe://sovereignty/agent/n1"]);
        let err = identity_from_der(&der, DEFAULT_TRUST_DOMAIN).expect_err("must refuse");
        assert!(matches!(err, AuthError::WrongTrustDomain { .. }), "{err:?}");
    }

    #[test]
    fn an_unknown_role_is_refused_naming_the_role_and_the_valid_ones() {
        let der = cert_with_uris(&["spiffe://sovereign/pirate/x"]);
        let err = identity_from_der(&der, DEFAULT_TRUST_DOMAIN).expect_err("must refuse");
        assert!(
            matches!(&err, AuthError::UnknownRole { role } if role == "pirate"),
            "{err:?}"
        );
        assert!(err.to_string().contains("agent, regulator, admin"), "{err}");
    }

    #[test]
    fn a_certificate_without_a_uri_san_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = pki::init(dir.path(), &[], DEFAULT_TRUST_DOMAIN).expect("init");
        let der = pem_to_der(&std::fs::read_to_string(files.collector.cert).expect("read"));
        let err = identity_from_der(&der, DEFAULT_TRUST_DOMAIN).expect_err("must refuse");
        assert!(matches!(err, AuthError::MissingSpiffeId), "{err:?}");
    }

    #[test]
    fn two_spiffe_ids_in_our_trust_domain_are_ambiguous_and_refused() {
        let der = cert_with_uris(&["spiffe://sovereign/agent/a", "spiffe://sovereign/admin/a"]);
        let err = identity_from_der(&der, DEFAULT_TRUST_DOMAIN).expect_err("must refuse");
        assert!(
            matches!(err, AuthError::MultipleSpiffeIds { count: 2, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_spiffe_id_in_another_domain_beside_ours_does_not_matter() {
        let der = cert_with_uris(&["spiffe://other/admin/a", "spiffe://sovereign/agent/a"]);
        let id = identity_from_der(&der, DEFAULT_TRUST_DOMAIN).expect("identity");
        assert_eq!(id.role, Role::Agent);
    }

    #[test]
    fn malformed_spiffe_paths_and_bad_names_are_refused() {
        for uri in [
            "spiffe://sovereign/agent",
            "spiffe://sovereign/agent/a/b",
            "spiffe://sovereign/agent/a?x=1",
        ] {
            let err =
                identity_from_der(&cert_with_uris(&[uri]), DEFAULT_TRUST_DOMAIN).expect_err(uri);
            assert!(
                matches!(err, AuthError::MalformedSpiffeId { .. }),
                "{uri}: {err:?}"
            );
        }
        let err = identity_from_der(
            &cert_with_uris(&["spiffe://sovereign/agent/.hidden"]),
            DEFAULT_TRUST_DOMAIN,
        )
        .expect_err("must refuse");
        assert!(matches!(err, AuthError::InvalidName { .. }), "{err:?}");
    }

    #[test]
    fn garbage_bytes_are_not_a_certificate() {
        let err =
            identity_from_der(b"not a certificate", DEFAULT_TRUST_DOMAIN).expect_err("must refuse");
        assert!(matches!(err, AuthError::Parse(_)), "{err:?}");
    }

    #[test]
    fn validate_name_rejects_empty_traversal_spaces_and_overlong_names() {
        for name in ["", "../x", "a b", &"a".repeat(200), ".x", "-x", "a/b", "é"] {
            assert!(validate_name(name).is_err(), "{name:?} must be refused");
        }
        for name in ["a", "gpu-node-17", "anrt.ma", "A_1", &"a".repeat(128)] {
            validate_name(name).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        }
    }

    #[test]
    fn validate_trust_domain_rejects_empty_uppercase_and_slashes() {
        for td in ["", "Sovereign", "a/b", "a b"] {
            assert!(validate_trust_domain(td).is_err(), "{td:?} must be refused");
        }
        validate_trust_domain("sovereign.example-1").expect("valid");
    }

    #[test]
    fn roles_round_trip_through_their_names_and_unknown_ones_list_the_valid_roles() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().expect("parse"), role);
            assert_eq!(role.to_string(), role.as_str());
        }
        let err = "Agent".parse::<Role>().expect_err("case matters");
        assert!(err.to_string().contains("agent, regulator, admin"), "{err}");
    }

    #[test]
    fn a_request_without_a_client_certificate_is_unauthenticated() {
        let req = tonic::Request::new(());
        let status = identity_from_request(&req, DEFAULT_TRUST_DOMAIN).expect_err("no cert");
        assert_eq!(status.code(), crate::error::ErrorCode::Unauthenticated);
        assert!(status.message().contains("client certificate required"));
    }

    #[test]
    fn require_role_denies_other_roles_naming_the_role_and_the_call() {
        let id = Identity {
            name: "n1".into(),
            role: Role::Agent,
        };
        require_role(&id, &[Role::Agent], "Ingest.Report").expect("allowed");
        let status =
            require_role(&id, &[Role::Regulator, Role::Admin], "Query.Breaches").expect_err("deny");
        assert_eq!(status.code(), crate::error::ErrorCode::PermissionDenied);
        let msg = status.message();
        assert!(
            msg.contains("agent") && msg.contains("Query.Breaches"),
            "{msg}"
        );
        assert!(msg.contains("regulator, admin"), "{msg}");
    }
}
