//! `sov-collector pki init|issue`: certificates without openssl ([`crate::pki`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::fail;
use crate::auth::{DEFAULT_TRUST_DOMAIN, Role};

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA and the collector's server certificate in DIR.
    Init {
        /// Directory for ca.pem, ca.key, collector.pem, collector.key.
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS name or IP address for the collector certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// SPIFFE trust domain.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Issue a client certificate DIR/NAME.pem and DIR/NAME.key signed by DIR/ca.pem.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// agent, regulator or admin.
        #[arg(long)]
        role: Role,
        /// Node name (agents) or person/tool name.
        #[arg(long)]
        name: String,
        /// SPIFFE trust domain.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Also write DIR/NAME.p12, a PKCS#12 bundle of the certificate, the CA and the key
        /// for a browser (the console); its password is printed once.
        #[arg(long)]
        p12: bool,
    },
}

/// Run one `pki` command.
pub(super) fn run(command: PkiCommand) -> ExitCode {
    match command {
        PkiCommand::Init {
            dir,
            sans,
            trust_domain,
        } => match crate::pki::init(&dir, &sans, &trust_domain) {
            Ok(files) => {
                println!("CA certificate:        {}", files.ca_cert.display());
                println!("CA key (keep offline): {}", files.ca_key.display());
                println!("collector certificate: {}", files.collector.cert.display());
                println!("collector key:         {}", files.collector.key.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        PkiCommand::Issue {
            dir,
            role,
            name,
            trust_domain,
            p12,
        } => match crate::pki::issue(&dir, role, &name, &trust_domain) {
            Ok(pair) => {
                println!("{role} certificate: {}", pair.cert.display());
                println!("{role} key:         {}", pair.key.display());
                if p12 {
                    match write_p12(&dir, &name, &pair) {
                        Ok((path, password)) => {
                            println!(
                                "{role} bundle:      {} (PKCS#12 for a browser)",
                                path.display()
                            );
                            println!(
                                "bundle password:    {password}  (shown once; the browser asks for it on import)"
                            );
                        }
                        Err(e) => {
                            eprintln!("sov-collector: cannot write the PKCS#12 bundle: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
    }
}

/// Write `dir/name.p12` (mode 0600) from the pair just issued and `dir/ca.pem`; its path and
/// the generated password.
fn write_p12(
    dir: &std::path::Path,
    name: &str,
    pair: &crate::pki::PathPair,
) -> Result<(PathBuf, String), String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let first_cert = |p: &std::path::Path| -> Result<Vec<u8>, String> {
        CertificateDer::pem_file_iter(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .next()
            .ok_or_else(|| format!("{}: no certificate", p.display()))?
            .map(|c| c.as_ref().to_vec())
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let cert = first_cert(&pair.cert)?;
    let ca = first_cert(&dir.join(crate::pki::CA_CERT_FILE))?;
    let key = match PrivateKeyDer::from_pem_file(&pair.key)
        .map_err(|e| format!("{}: {e}", pair.key.display()))?
    {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        _ => return Err(format!("{}: not a PKCS#8 key", pair.key.display())),
    };
    let password = crate::p12::generate_password().map_err(|e| e.to_string())?;
    let bundle =
        crate::p12::bundle(name, &cert, &ca, &key, &password).map_err(|e| e.to_string())?;
    let path = dir.join(format!("{name}.p12"));
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(&bundle)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path, password))
}
