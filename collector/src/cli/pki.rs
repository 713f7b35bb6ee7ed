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
        } => match crate::pki::issue(&dir, role, &name, &trust_domain) {
            Ok(pair) => {
                println!("{role} certificate: {}", pair.cert.display());
                println!("{role} key:         {}", pair.key.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
    }
}
