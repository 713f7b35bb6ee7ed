//! Certificates without openssl: the project's own small PKI (rcgen).
//!
//! One directory holds everything, all PEM:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` | self-signed CA ("Sovereign CA"), 10 years, may sign leaves only |
//! | `collector.pem`, `collector.key` | the collector's server certificate: DNS `localhost`, IP `127.0.0.1`, IP `::1` and any extra SANs; 2 years |
//! | `<name>.pem`, `<name>.key` | a client certificate with URI SAN `spiffe://<trust-domain>/<role>/<name>` (see `auth`); 1 year |
//!
//! - [`init`] creates the CA and the collector certificate (`sov-collector pki init`).
//! - [`issue`] signs one client certificate with the CA found in the directory
//!   (`sov-collector pki issue`); [`issue_with_ca`] does the same in memory.
//! - [`ensure_dev`] builds (or reuses, untouched) a complete development PKI.
//!
//! Private keys are created with mode 0600 from the first byte on; certificates are 0644.
//! Each file is written to a temporary name in the same directory, synced, then renamed, so a
//! reader never sees half a file. Nothing is ever silently overwritten: `init` refuses when
//! `ca.pem` exists, `issue` refuses when `<name>.pem` exists.
//! Validity periods start one hour in the past to tolerate clock skew between machines.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use time::{Duration, OffsetDateTime};

use crate::auth::{self, AuthError, Identity, Role};

/// CA certificate file name inside the PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// CA private key file name inside the PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Base name of the collector's server certificate and key.
pub const COLLECTOR_NAME: &str = "collector";
/// Name of the regulator certificate made by [`ensure_dev`].
pub const DEV_REGULATOR_NAME: &str = "regulator";
/// Name of the admin certificate made by [`ensure_dev`].
pub const DEV_ADMIN_NAME: &str = "admin";

/// Common name of the CA certificate.
const CA_COMMON_NAME: &str = "Sovereign CA";
/// Organisation in every subject.
const ORGANIZATION: &str = "Sovereign";
/// Common name of the collector's server certificate.
const COLLECTOR_COMMON_NAME: &str = "sov-collector";
/// SANs every collector certificate carries.
const COLLECTOR_DEFAULT_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// CA validity: 10 years.
const CA_VALIDITY_DAYS: i64 = 3653;
/// Collector server certificate validity: 2 years.
const COLLECTOR_VALIDITY_DAYS: i64 = 731;
/// Client (leaf) certificate validity: 1 year.
const LEAF_VALIDITY_DAYS: i64 = 365;
/// How far in the past every validity period starts (clock skew tolerance).
const BACKDATE_HOURS: i64 = 1;

/// Mode of private key files.
const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
const CERT_MODE: u32 = 0o644;
/// Mode of a PKI directory created here.
const DIR_MODE: u32 = 0o700;

/// A certificate and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPair {
    /// The certificate (`.pem`).
    pub cert: PathBuf,
    /// The private key (`.key`, PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
}

impl PathPair {
    /// `<dir>/<name>.pem` and `<dir>/<name>.key`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

/// What [`init`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiFiles {
    /// The CA certificate: give it to agents and to the collector as the client CA root.
    pub ca_cert: PathBuf,
    /// The CA private key: keep it away from the collector host in production.
    pub ca_key: PathBuf,
    /// The collector's server certificate and key.
    pub collector: PathPair,
}

/// Every path of a development PKI (see [`ensure_dev`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// The CA certificate (`ca.pem`).
    pub ca: PathBuf,
    /// The collector's server certificate and key.
    pub collector: PathPair,
    /// The agent's client certificate and key (role agent).
    pub agent: PathPair,
    /// A regulator client certificate and key (name and role `regulator`).
    pub regulator: PathPair,
    /// An admin client certificate and key (name and role `admin`).
    pub admin: PathPair,
}

/// Why a PKI operation failed. Every message names the path or value at fault.
#[derive(thiserror::Error, Debug)]
pub enum PkiError {
    /// `init` found an existing CA.
    #[error("{} already exists: the PKI is already initialised", path.display())]
    AlreadyInitialised {
        /// The existing CA certificate.
        path: PathBuf,
    },
    /// `issue` found no CA in the directory.
    #[error("no CA in {dir}: run `sov-collector pki init --dir {dir}` first", dir = dir.display())]
    CaMissing {
        /// The PKI directory.
        dir: PathBuf,
    },
    /// `issue` found an existing certificate for the name.
    #[error("{} already exists: refusing to overwrite it", path.display())]
    CertExists {
        /// The existing certificate.
        path: PathBuf,
    },
    /// A file that an initialised PKI directory must hold is missing.
    #[error("{} is missing from the initialised PKI directory", path.display())]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// An existing certificate is not the one [`ensure_dev`] expects (other role, name or
    /// trust domain).
    #[error("{} is not the expected {expected} certificate: {found}", path.display())]
    Mismatch {
        /// The certificate file.
        path: PathBuf,
        /// The SPIFFE id expected.
        expected: String,
        /// What was found instead.
        found: String,
    },
    /// A name that [`ensure_dev`] uses for its own files.
    #[error(
        "name {name:?} is reserved (ca, collector, regulator and admin are used by the dev PKI)"
    )]
    ReservedName {
        /// The name given.
        name: String,
    },
    /// An extra SAN for the collector certificate is neither an IP address nor a DNS name.
    #[error("invalid collector SAN {san:?}: {reason}")]
    InvalidSan {
        /// The SAN as given.
        san: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An invalid name or trust domain.
    #[error(transparent)]
    Invalid(#[from] AuthError),
    /// The CA certificate or key could not be loaded.
    #[error("could not load the CA from {}", path.display())]
    CaLoad {
        /// The file that failed to load.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// Key generation or signing failed.
    #[error("could not {what}")]
    Generate {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// A file system operation failed.
    #[error("could not {op} {}", path.display())]
    Io {
        /// The operation (`read`, `write`, `create directory`, ...).
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl PkiError {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PkiError {
        let path = path.to_path_buf();
        move |source| PkiError::Io { op, path, source }
    }

    fn generate(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
        let what = what.into();
        move |source| PkiError::Generate { what, source }
    }
}

/// Create a CA and the collector's server certificate in `dir`.
///
/// `dir` is created with mode 0700 if missing. Refuses if `dir/ca.pem` exists. `extra_sans` are
/// added to the collector certificate's defaults (`localhost`, `127.0.0.1`, `::1`): a value
/// that parses as an IP address becomes an IP SAN, anything else must be a DNS name (a
/// leading `*.` wildcard is allowed). `trust_domain` is only validated here (the collector
/// certificate carries no SPIFFE id); it is taken so that `init` refuses a domain `issue`
/// would refuse later.
pub fn init(dir: &Path, extra_sans: &[String], trust_domain: &str) -> Result<PkiFiles, PkiError> {
    auth::validate_trust_domain(trust_domain)?;
    let files = PkiFiles {
        ca_cert: dir.join(CA_CERT_FILE),
        ca_key: dir.join(CA_KEY_FILE),
        collector: PathPair::in_dir(dir, COLLECTOR_NAME),
    };
    if exists(&files.ca_cert)? {
        return Err(PkiError::AlreadyInitialised {
            path: files.ca_cert,
        });
    }
    let sans = collector_sans(extra_sans)?;

    let now = OffsetDateTime::now_utc();

    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = subject(CA_COMMON_NAME);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca_params, now, CA_VALIDITY_DAYS);
    let ca_key = KeyPair::generate().map_err(PkiError::generate("generate the CA key"))?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(PkiError::generate("self-sign the CA certificate"))?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::default();
    params.distinguished_name = subject(COLLECTOR_COMMON_NAME);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, now, COLLECTOR_VALIDITY_DAYS);
    let key = KeyPair::generate().map_err(PkiError::generate("generate the collector key"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(PkiError::generate("sign the collector certificate"))?;

    create_dir(dir)?;
    // ca.pem last: its presence means "initialised", so a failure before it can be retried.
    write_file(&files.ca_key, ca_key_pem.as_bytes(), KEY_MODE)?;
    write_file(
        &files.collector.key,
        key.serialize_pem().as_bytes(),
        KEY_MODE,
    )?;
    write_file(&files.collector.cert, cert.pem().as_bytes(), CERT_MODE)?;
    write_file(&files.ca_cert, ca_cert.pem().as_bytes(), CERT_MODE)?;
    sync_dir(dir)?;
    Ok(files)
}

/// Sign a client certificate for `role`/`name` with the CA in `dir`, writing
/// `dir/<name>.pem` and `dir/<name>.key`.
///
/// Refuses when `dir/<name>.pem` exists (this also protects `ca` and `collector`).
pub fn issue(dir: &Path, role: Role, name: &str, trust_domain: &str) -> Result<PathPair, PkiError> {
    auth::validate_name(name)?;
    auth::validate_trust_domain(trust_domain)?;
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_cert_pem = match fs::read_to_string(&ca_cert_path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(PkiError::CaMissing {
                dir: dir.to_path_buf(),
            });
        }
        Err(e) => return Err(PkiError::io("read", &ca_cert_path)(e)),
    };
    let pair = PathPair::in_dir(dir, name);
    if exists(&pair.cert)? {
        return Err(PkiError::CertExists { path: pair.cert });
    }
    let ca_key_pem =
        fs::read_to_string(&ca_key_path).map_err(PkiError::io("read", &ca_key_path))?;

    let (cert_pem, key_pem) = issue_with_ca_at(
        &ca_cert_pem,
        &ca_cert_path,
        &ca_key_pem,
        &ca_key_path,
        role,
        name,
        trust_domain,
    )?;
    write_file(&pair.key, key_pem.as_bytes(), KEY_MODE)?;
    write_file(&pair.cert, cert_pem.as_bytes(), CERT_MODE)?;
    sync_dir(dir)?;
    Ok(pair)
}

/// Sign a client certificate for `role`/`name` with the given CA, in memory.
///
/// Returns `(cert_pem, key_pem)`. The certificate has CN = `name`, the URI SAN
/// `spiffe://<trust_domain>/<role>/<name>`, extended key usage clientAuth, and is valid for
/// one year (from one hour ago).
pub fn issue_with_ca(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    role: Role,
    name: &str,
    trust_domain: &str,
) -> Result<(String, String), PkiError> {
    issue_with_ca_at(
        ca_cert_pem,
        Path::new("<CA certificate PEM>"),
        ca_key_pem,
        Path::new("<CA key PEM>"),
        role,
        name,
        trust_domain,
    )
}

/// [`issue_with_ca`], naming the CA's files in errors.
fn issue_with_ca_at(
    ca_cert_pem: &str,
    ca_cert_path: &Path,
    ca_key_pem: &str,
    ca_key_path: &Path,
    role: Role,
    name: &str,
    trust_domain: &str,
) -> Result<(String, String), PkiError> {
    auth::validate_name(name)?;
    auth::validate_trust_domain(trust_domain)?;
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|source| PkiError::CaLoad {
        path: ca_key_path.to_path_buf(),
        source,
    })?;
    let issuer =
        Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(|source| PkiError::CaLoad {
            path: ca_cert_path.to_path_buf(),
            source,
        })?;

    let spiffe = auth::spiffe_id(trust_domain, role, name);
    let now = OffsetDateTime::now_utc();
    let params = client_params(
        role,
        name,
        trust_domain,
        now - Duration::hours(BACKDATE_HOURS),
        now + Duration::days(LEAF_VALIDITY_DAYS),
    )?;

    let key =
        KeyPair::generate().map_err(PkiError::generate(format!("generate a key for {name}")))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(PkiError::generate(format!(
            "sign the certificate for {spiffe}"
        )))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The parameters of a client certificate for `role`/`name`: CN = `name`, the URI SAN
/// `spiffe://<trust_domain>/<role>/<name>`, extended key usage clientAuth, no CA, valid from
/// `not_before` to `not_after`. Used by [`issue`] and by enrollment ([`crate::enroll`]).
pub(crate) fn client_params(
    role: Role,
    name: &str,
    trust_domain: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    auth::validate_name(name)?;
    auth::validate_trust_domain(trust_domain)?;
    let spiffe = auth::spiffe_id(trust_domain, role, name);
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(name);
    params.subject_alt_names =
        vec![SanType::URI(spiffe.clone().try_into().map_err(
            PkiError::generate(format!("encode the SAN {spiffe}")),
        )?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// Make sure `dir` holds a complete development PKI and return its paths.
///
/// Runs [`init`] when `ca.pem` is missing, then issues `<agent_name>` (role agent),
/// `regulator` (role regulator) and `admin` (role admin) for each whose `.pem` is missing.
/// Existing files are never rewritten; an existing certificate must carry the expected
/// SPIFFE id (so a changed trust domain or agent name is reported, not silently ignored).
pub fn ensure_dev(dir: &Path, agent_name: &str, trust_domain: &str) -> Result<DevPki, PkiError> {
    auth::validate_name(agent_name)?;
    auth::validate_trust_domain(trust_domain)?;
    if ["ca", COLLECTOR_NAME, DEV_REGULATOR_NAME, DEV_ADMIN_NAME].contains(&agent_name) {
        return Err(PkiError::ReservedName {
            name: agent_name.to_owned(),
        });
    }

    let ca = dir.join(CA_CERT_FILE);
    let collector = if exists(&ca)? {
        let collector = PathPair::in_dir(dir, COLLECTOR_NAME);
        for path in [&collector.cert, &collector.key] {
            if !exists(path)? {
                return Err(PkiError::Missing { path: path.clone() });
            }
        }
        collector
    } else {
        init(dir, &[], trust_domain)?.collector
    };

    let ensure = |role: Role, name: &str| -> Result<PathPair, PkiError> {
        let pair = PathPair::in_dir(dir, name);
        if !exists(&pair.cert)? {
            return issue(dir, role, name, trust_domain);
        }
        check_identity(&pair.cert, role, name, trust_domain)?;
        if !exists(&pair.key)? {
            return Err(PkiError::Missing { path: pair.key });
        }
        Ok(pair)
    };
    let agent = ensure(Role::Agent, agent_name)?;
    let regulator = ensure(Role::Regulator, DEV_REGULATOR_NAME)?;
    let admin = ensure(Role::Admin, DEV_ADMIN_NAME)?;

    Ok(DevPki {
        ca,
        collector,
        agent,
        regulator,
        admin,
    })
}

/// Check that the certificate at `path` carries `spiffe://<trust_domain>/<role>/<name>`.
fn check_identity(path: &Path, role: Role, name: &str, trust_domain: &str) -> Result<(), PkiError> {
    let pem = fs::read(path).map_err(PkiError::io("read", path))?;
    let mismatch = |found: String| PkiError::Mismatch {
        path: path.to_path_buf(),
        expected: auth::spiffe_id(trust_domain, role, name),
        found,
    };
    let der = CertificateDer::from_pem_slice(&pem)
        .map_err(|e| mismatch(format!("not a PEM certificate ({e})")))?;
    let expected = Identity {
        name: name.to_owned(),
        role,
    };
    match auth::identity_from_der(&der, trust_domain) {
        Ok(id) if id == expected => Ok(()),
        Ok(id) => Err(mismatch(format!("it is {}/{}", id.role, id.name))),
        Err(e) => Err(mismatch(e.to_string())),
    }
}

/// The collector certificate's SANs: the defaults plus `extra`, without duplicates.
fn collector_sans(extra: &[String]) -> Result<Vec<SanType>, PkiError> {
    let mut sans = Vec::new();
    for raw in COLLECTOR_DEFAULT_SANS
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
    {
        let san = parse_san(raw)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

/// One SAN: an IP address if it parses as one, else a DNS name (optionally `*.`-prefixed).
fn parse_san(raw: &str) -> Result<SanType, PkiError> {
    let invalid = |reason| PkiError::InvalidSan {
        san: raw.to_owned(),
        reason,
    };
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let host = raw.strip_prefix("*.").unwrap_or(raw);
    if rustls::pki_types::DnsName::try_from(host).is_err() || host.contains('*') {
        return Err(invalid("neither an IP address nor a valid DNS name"));
    }
    let name = raw
        .to_ascii_lowercase()
        .try_into()
        .map_err(|_| invalid("not an ASCII DNS name"))?;
    Ok(SanType::DnsName(name))
}

/// Subject with `common_name` and the project's organisation.
fn subject(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Valid from `BACKDATE_HOURS` before `now` for `days` days after `now`.
fn set_validity(params: &mut CertificateParams, now: OffsetDateTime, days: i64) {
    params.not_before = now - Duration::hours(BACKDATE_HOURS);
    params.not_after = now + Duration::days(days);
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(PkiError::io("check", path))
}

/// Create `dir` (and parents) with mode 0700 when missing; an existing directory is kept as is.
fn create_dir(dir: &Path) -> Result<(), PkiError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(PkiError::io("create directory", dir))
}

/// Write `contents` to `path` with `mode`: to a temporary file in the same directory created
/// with that mode (never more permissive, even briefly), synced, then renamed over `path`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    // A stale temporary file keeps its old mode if opened again: remove it and create anew.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(PkiError::io("remove", &tmp)(e)),
    }
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have removed bits (e.g. 0644 → 0600); set exactly what was asked.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(PkiError::io("write", &tmp)(e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        PkiError::io("rename into place", path)(e)
    })
}

/// Make the renames in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), PkiError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(PkiError::io("sync directory", dir))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::RootCertStore;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{PrivateKeyDer, ServerName, UnixTime};
    use rustls::server::WebPkiClientVerifier;

    use super::*;
    use crate::auth::DEFAULT_TRUST_DOMAIN as TD;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn cert_der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).expect("certificate pem")
    }

    fn roots(ca: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(cert_der(ca)).expect("add root");
        Arc::new(roots)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    fn read_all(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| {
                let p = e.expect("entry").path();
                let bytes = fs::read(&p).expect("read");
                (p, bytes)
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn init_writes_the_four_files_with_keys_readable_only_by_the_owner() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki");
        let files = init(&dir, &[], TD).expect("init");

        assert_eq!(mode(&dir), 0o700);
        for p in [
            &files.ca_cert,
            &files.ca_key,
            &files.collector.cert,
            &files.collector.key,
        ] {
            assert!(p.is_file(), "{} missing", p.display());
        }
        assert_eq!(mode(&files.ca_key), 0o600);
        assert_eq!(mode(&files.collector.key), 0o600);
        assert_eq!(mode(&files.ca_cert), 0o644);
        assert_eq!(mode(&files.collector.cert), 0o644);
        let names: Vec<_> = read_all(&dir)
            .into_iter()
            .map(|(p, _)| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["ca.key", "ca.pem", "collector.key", "collector.pem"]
        );
    }

    #[test]
    fn the_ca_is_a_ca_for_leaves_only_and_valid_from_an_hour_ago_for_ten_years() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = init(dir.path(), &[], TD).expect("init");
        let der = cert_der(&files.ca_cert);
        let (_, ca) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let bc = ca.basic_constraints().expect("bc").expect("present").value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = ca.key_usage().expect("ku").expect("present").value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert!(ca.subject().to_string().contains("CN=Sovereign CA"));
        let now = OffsetDateTime::now_utc();
        let nb = ca.validity().not_before.to_datetime();
        let na = ca.validity().not_after.to_datetime();
        assert!(nb < now - Duration::minutes(59) && nb > now - Duration::minutes(61));
        assert!(na > now + Duration::days(3650) && na < now + Duration::days(3660));
    }

    #[test]
    fn a_second_init_refuses_and_leaves_the_ca_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), &[], TD).expect("init");
        let before = read_all(dir.path());
        let err = init(dir.path(), &[], TD).expect_err("second init must refuse");
        assert!(
            matches!(&err, PkiError::AlreadyInitialised { path } if path.ends_with("ca.pem")),
            "{err:?}"
        );
        assert_eq!(read_all(dir.path()), before);
    }

    #[test]
    fn an_invalid_extra_san_is_refused_by_name_and_nothing_is_written() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki");
        let err = init(&dir, &["bad name!".to_owned()], TD).expect_err("must refuse");
        assert!(err.to_string().contains("\"bad name!\""), "{err}");
        assert!(!dir.exists());
    }

    #[test]
    fn the_collector_certificate_verifies_as_a_server_for_localhost_loopback_and_extra_sans() {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = [
            "collector.example.org".to_owned(),
            "10.1.2.3".to_owned(),
            "*.sov.example.org".to_owned(),
            "localhost".to_owned(),
        ];
        let files = init(dir.path(), &extra, TD).expect("init");
        let verifier =
            WebPkiServerVerifier::builder_with_provider(roots(&files.ca_cert), provider())
                .build()
                .expect("verifier");
        let leaf = cert_der(&files.collector.cert);
        let verify = |name: &'static str| {
            verifier.verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(name).expect("server name"),
                &[],
                UnixTime::now(),
            )
        };
        for ok in [
            "localhost",
            "127.0.0.1",
            "::1",
            "collector.example.org",
            "10.1.2.3",
            "node.sov.example.org",
        ] {
            verify(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["example.org", "10.1.2.4"] {
            assert!(verify(bad).is_err(), "{bad} must not verify");
        }
        // The key on disk belongs to the certificate.
        let key = PrivateKeyDer::from_pem_file(&files.collector.key).expect("key pem");
        rustls::sign::CertifiedKey::from_der(vec![leaf.clone()], key, &provider())
            .expect("key matches certificate");
    }

    #[test]
    fn an_issued_leaf_verifies_against_its_ca_and_not_against_another_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = init(dir.path(), &[], TD).expect("init");
        let pair = issue(dir.path(), Role::Agent, "gpu-node-1", TD).expect("issue");
        assert_eq!(mode(&pair.key), 0o600);
        assert_eq!(mode(&pair.cert), 0o644);

        let other = tempfile::tempdir().expect("tempdir");
        init(other.path(), &[], TD).expect("init other");
        let foreign = issue(other.path(), Role::Agent, "gpu-node-1", TD).expect("issue other");

        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots(&files.ca_cert), provider())
                .build()
                .expect("verifier");
        let leaf = cert_der(&pair.cert);
        verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .expect("issued leaf must verify");
        assert!(
            verifier
                .verify_client_cert(&cert_der(&foreign.cert), &[], UnixTime::now())
                .is_err(),
            "a leaf from another CA must not verify"
        );
        let key = PrivateKeyDer::from_pem_file(&pair.key).expect("key pem");
        rustls::sign::CertifiedKey::from_der(vec![leaf], key, &provider())
            .expect("key matches certificate");
    }

    #[test]
    fn issue_with_ca_in_memory_yields_the_spiffe_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = init(dir.path(), &[], "example.org").expect("init");
        let ca_pem = fs::read_to_string(&files.ca_cert).expect("ca");
        let ca_key = fs::read_to_string(&files.ca_key).expect("key");
        let (cert_pem, key_pem) =
            issue_with_ca(&ca_pem, &ca_key, Role::Admin, "ops", "example.org").expect("issue");
        assert!(key_pem.contains("PRIVATE KEY"));
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("pem");
        let id = auth::identity_from_der(&der, "example.org").expect("identity");
        assert_eq!((id.name.as_str(), id.role), ("ops", Role::Admin));
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).expect("parse");
        assert!(leaf.subject().to_string().contains("CN=ops"));
        let eku = leaf
            .extended_key_usage()
            .expect("eku")
            .expect("present")
            .value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[test]
    fn issue_without_a_ca_says_to_run_init_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = issue(dir.path(), Role::Agent, "n1", TD).expect_err("no CA");
        assert!(matches!(err, PkiError::CaMissing { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "run `sov-collector pki init --dir {}` first",
                dir.path().display()
            )),
            "{msg}"
        );
    }

    #[test]
    fn issue_refuses_to_overwrite_an_existing_certificate_or_a_bad_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), &[], TD).expect("init");
        let pair = issue(dir.path(), Role::Agent, "n1", TD).expect("issue");
        let before = read_all(dir.path());
        let err = issue(dir.path(), Role::Regulator, "n1", TD).expect_err("exists");
        assert!(
            matches!(&err, PkiError::CertExists { path } if *path == pair.cert),
            "{err:?}"
        );
        for name in ["collector", "ca"] {
            let err = issue(dir.path(), Role::Admin, name, TD).expect_err(name);
            assert!(
                matches!(err, PkiError::CertExists { .. }),
                "{name}: {err:?}"
            );
        }
        let err = issue(dir.path(), Role::Agent, "../escape", TD).expect_err("bad name");
        assert!(
            matches!(err, PkiError::Invalid(AuthError::InvalidName { .. })),
            "{err:?}"
        );
        assert_eq!(read_all(dir.path()), before);
        assert!(!dir.path().join("../escape.pem").exists());
    }

    #[test]
    fn ensure_dev_creates_everything_then_reuses_it_byte_for_byte() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("dev-pki");
        let first = ensure_dev(&dir, "node-a", TD).expect("first");
        let before = read_all(&dir);
        assert_eq!(
            before.len(),
            10,
            "ca, collector, node-a, regulator, admin: pem + key"
        );
        for (pair, role, name) in [
            (&first.agent, Role::Agent, "node-a"),
            (&first.regulator, Role::Regulator, "regulator"),
            (&first.admin, Role::Admin, "admin"),
        ] {
            let id = auth::identity_from_der(&cert_der(&pair.cert), TD).expect("identity");
            assert_eq!((id.name.as_str(), id.role), (name, role));
            assert_eq!(mode(&pair.key), 0o600);
        }

        let second = ensure_dev(&dir, "node-a", TD).expect("second");
        assert_eq!(first, second);
        assert_eq!(read_all(&dir), before);
    }

    #[test]
    fn ensure_dev_issues_only_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ensure_dev(dir.path(), "node-a", TD).expect("first");
        let ca = fs::read(&first.ca).expect("ca");
        let regulator = fs::read(&first.regulator.cert).expect("regulator");
        fs::remove_file(&first.admin.cert).expect("rm");
        let second = ensure_dev(dir.path(), "node-a", TD).expect("second");
        assert_eq!(fs::read(&second.ca).expect("ca"), ca);
        assert_eq!(
            fs::read(&second.regulator.cert).expect("regulator"),
            regulator
        );
        let id = auth::identity_from_der(&cert_der(&second.admin.cert), TD).expect("admin");
        assert_eq!(id.role, Role::Admin);
    }

    #[test]
    fn ensure_dev_reports_certificates_from_another_trust_domain_and_reserved_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        ensure_dev(dir.path(), "node-a", TD).expect("first");
        let err = ensure_dev(dir.path(), "node-a", "other").expect_err("other domain");
        assert!(matches!(err, PkiError::Mismatch { .. }), "{err:?}");
        assert!(
            err.to_string().contains("spiffe://other/agent/node-a"),
            "{err}"
        );

        for name in ["regulator", "admin", "collector", "ca"] {
            let err = ensure_dev(dir.path(), name, TD).expect_err(name);
            assert!(
                matches!(err, PkiError::ReservedName { .. }),
                "{name}: {err:?}"
            );
        }
    }
}
