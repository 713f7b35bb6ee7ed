//! The `sov-collector` command line, one file per command group (mini-redis `src/cmd/`):
//! `serve`, `pki` (`init`, `issue`), `geo` (`lookup`), `policy` (`check`),
//! `token` (`create`, `list`, `revoke`), `enroll_token` (`create`), `verify` (`verify-log`,
//! `verify-audit`); `dev` is [`crate::dev`]. The binary only calls [`main`]; nothing in the
//! library imports this module.

use std::path::PathBuf;
use std::process::ExitCode;

mod enroll_token;
mod geo;
mod pki;
mod policy;
mod serve;
mod token;
mod verify;

pub use serve::serve;

use clap::{Parser, Subcommand};
use sov_common::cli::{Logging, shutdown_signal};
use sov_common::config::ConfigError;
use sov_common::error::source_chain;

use crate::config::CollectorConfig;

/// Sovereign collector: receives agents' reports over mutual TLS, stores them, answers regulators.
#[derive(Debug, Parser)]
#[command(name = "sov-collector", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    logging: Logging,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve gRPC (Ingest, Query) until SIGINT or SIGTERM.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short, env = "SOV_COLLECTOR_CONFIG")]
        config: PathBuf,
        /// Validate the configuration, print every problem, and exit (64 when invalid).
        #[arg(long)]
        check_config: bool,
        /// Run even when a private key (`tls.key`, `enroll.ca_key`) is readable by group or
        /// others (refused otherwise, as ssh does), with a warning in the log.
        #[arg(long, env = "SOV_ALLOW_INSECURE_KEYS")]
        allow_insecure_keys: bool,
    },
    /// Certificates for the collector, agents, regulators and admins (no openssl needed).
    Pki {
        #[command(subcommand)]
        command: pki::PkiCommand,
    },
    /// All-in-one quickstart: a collector on embedded SQLite plus an agent for this host.
    Dev(crate::dev::DevArgs),
    /// The process of `dev --demo` that holds the demo weights and sends them to the demo
    /// destination (started by `dev`, not by people).
    #[command(hide = true)]
    DemoSender {
        /// The demo weight file, held open while sending.
        #[arg(long)]
        weights: PathBuf,
        /// The demo destination.
        #[arg(long)]
        to: std::net::SocketAddr,
    },
    /// Geolocation: where the collector places addresses, and which database said so.
    Geo {
        #[command(subcommand)]
        command: geo::GeoCommand,
    },
    /// The jurisdiction policy file.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// API tokens for the HTTPS API (tools that cannot hold a client certificate).
    Token {
        #[command(subcommand)]
        command: token::TokenCommand,
    },
    /// Check the audit log's hash chain from its first record and against every checkpoint
    /// of its head the collector signed: prints the record count, the last hash and the last
    /// checkpoint (exit 0), or the first bad record or checkpoint and why (exit 1).
    VerifyAudit {
        /// Configuration file (TOML) naming the store and the collector's certificate.
        #[arg(long, short, env = "SOV_COLLECTOR_CONFIG")]
        config: PathBuf,
        /// A signed checkpoint kept elsewhere: a file holding one (an alert's JSON body, an
        /// evidence report), checked as well. Repeatable.
        #[arg(long = "checkpoint", value_name = "FILE")]
        checkpoints: Vec<PathBuf>,
    },
    /// One-time enrollment tokens for `sov-agent enroll`.
    EnrollToken {
        #[command(subcommand)]
        command: enroll_token::EnrollTokenCommand,
    },
    /// Check the breach log's hash chain from its first record and against every checkpoint
    /// of its head the collector signed: prints the record count, the last hash and the last
    /// checkpoint (exit 0), or the first bad record or checkpoint and why (exit 1).
    VerifyLog {
        /// Configuration file (TOML) naming the store and the collector's certificate.
        #[arg(long, short, env = "SOV_COLLECTOR_CONFIG")]
        config: PathBuf,
        /// A signed checkpoint kept elsewhere: a file holding one (an alert's JSON body, an
        /// evidence report), checked as well. Repeatable.
        #[arg(long = "checkpoint", value_name = "FILE")]
        checkpoints: Vec<PathBuf>,
    },
}

/// Print a configuration error and exit with 64.
pub(super) fn report_config_error(err: &ConfigError) -> ExitCode {
    sov_common::cli::report_config_error("sov-collector", err)
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("sov-collector: cannot start runtime: {e}");
            ExitCode::FAILURE
        })
}

pub(super) fn fail(err: &dyn std::error::Error) -> ExitCode {
    let chain = source_chain(err);
    if chain.is_empty() {
        eprintln!("sov-collector: {err}");
    } else {
        eprintln!("sov-collector: {err}: {chain}");
    }
    ExitCode::FAILURE
}

/// Open the store a configuration names, on a fresh runtime, and run `f` on it.
pub(super) fn with_store<T>(
    config: &std::path::Path,
    f: impl AsyncFnOnce(&dyn crate::store::Store) -> Result<T, crate::store::StoreError>,
) -> Result<T, ExitCode> {
    let cfg = CollectorConfig::load(config).map_err(|e| report_config_error(&e))?;
    let rt = runtime()?;
    rt.block_on(async {
        let store = crate::store::open(&cfg.store.url, &cfg.data_dir).await?;
        f(store.as_ref()).await
    })
    .map_err(|e| fail(&e))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.logging.init();
    match cli.command {
        Command::Serve {
            config,
            check_config,
            allow_insecure_keys,
        } => serve::run(&config, check_config, allow_insecure_keys),
        Command::Pki { command } => pki::run(command),
        Command::Geo { command } => geo::run(command),
        Command::Policy { command } => policy::run(command),
        Command::VerifyLog {
            config,
            checkpoints,
        } => verify::run(&config, verify::Chain::Breaches, &checkpoints),
        Command::VerifyAudit {
            config,
            checkpoints,
        } => verify::run(&config, verify::Chain::Audit, &checkpoints),
        Command::Token { command } => token::run(command),
        Command::EnrollToken { command } => enroll_token::run(command),
        Command::DemoSender { weights, to } => match crate::dev::demo::sender(&weights, to) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Dev(args) => {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(crate::dev::run(args, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e.as_ref()),
            }
        }
    }
}
