//! `sov-collector enroll-token create`: one-time enrollment tokens for `sov-agent enroll`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use sov_common::cli::print_stdout;
use sov_common::config::EXIT_BAD_CONFIG;

use super::{fail, report_config_error, runtime};
use crate::config::CollectorConfig;

#[derive(Debug, Subcommand)]
pub enum EnrollTokenCommand {
    /// Make COUNT tokens valid for EXPIRES and print them, one a line, after the CA's sha256
    /// (the agents' `--ca-sha256`). Only their hashes are stored; each works once.
    Create {
        /// Configuration file (TOML) naming the store and `tls.ca`.
        #[arg(long, short, env = "SOV_COLLECTOR_CONFIG")]
        config: PathBuf,
        /// How many tokens (1 to 10000).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// How long they stay valid: a number and s, m, h or d (at most 365d).
        #[arg(long, default_value = "24h")]
        expires: String,
        /// Make one token that may enroll NODE although the name already has a certificate
        /// in use (an ordinary token is refused for such a name): replacing a node's key is
        /// an operator's decision, logged loudly when the token is spent. It enrolls NODE only.
        #[arg(long, value_name = "NODE")]
        replace: Option<String>,
    },
}

/// Run one `enroll-token` command.
pub(super) fn run(command: EnrollTokenCommand) -> ExitCode {
    match command {
        EnrollTokenCommand::Create {
            config,
            count,
            expires,
            replace,
        } => enroll_token_create(&config, count, expires.as_str(), replace.as_deref()),
    }
}

/// `enroll-token create`: store the hashes, print the CA's sha256 and the tokens.
fn enroll_token_create(
    config: &std::path::Path,
    count: u32,
    expires: &str,
    replace: Option<&str>,
) -> ExitCode {
    if replace.is_some() && count != 1 {
        eprintln!("sov-collector: --replace makes exactly one token; leave out --count");
        return ExitCode::from(EXIT_BAD_CONFIG as u8);
    }
    let cfg = match CollectorConfig::load(config) {
        Ok(c) => c,
        Err(e) => return report_config_error(&e),
    };
    let lifetime = match crate::enroll::parse_duration(expires) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("sov-collector: --expires: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    if cfg.enroll.ca_key.is_none() {
        eprintln!(
            "sov-collector: warning: [enroll] ca_key is not set in {}: collectors with this configuration refuse enrollment",
            config.display()
        );
    }
    let pin = match crate::enroll::ca_file_fingerprint(&cfg.tls.ca) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let made = rt.block_on(async {
        let store = crate::store::open(&cfg.store.url, &cfg.data_dir).await?;
        let now = sov_common::clock::now_unix_ms();
        match replace {
            Some(node) => {
                crate::enroll::create_replacement_token(store.as_ref(), node, lifetime, now)
                    .await
                    .map(|t| vec![t])
            }
            None => crate::enroll::create_tokens(store.as_ref(), count, lifetime, now).await,
        }
    });
    if let (Some(node), Ok(_)) = (replace, &made) {
        eprintln!(
            "sov-collector: warning: this token replaces the certificate of node {node:?}: whoever holds it becomes {node:?}; add the old certificate to the `[tls] revoked` file if it is not retired"
        );
    }
    match made {
        Ok(tokens) => {
            let mut out =
                format!("# ca-sha256 {pin}\n# {count} token(s), each valid once, for {expires}\n");
            for t in tokens {
                out.push_str(&t);
                out.push('\n');
            }
            print_stdout(&out)
        }
        Err(e) => fail(&e),
    }
}
