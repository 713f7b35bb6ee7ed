//! The `sov-collector` command line: `serve`, `pki init`, `pki issue`, `dev`, `geo lookup`,
//! `policy check`, `verify-log`, `verify-audit`, `token create`, `enroll-token create`.

use std::path::PathBuf;
use std::process::ExitCode;

mod geo;

use clap::{Parser, Subcommand};
use sov_common::cli::{LogFormat, init_tracing, print_stdout, shutdown_signal};
use sov_common::config::{ConfigError, EXIT_BAD_CONFIG};
use sov_common::error::source_chain;

use crate::auth::{DEFAULT_TRUST_DOMAIN, Role};
use crate::config::CollectorConfig;

/// Sovereign collector: receives agents' reports over mutual TLS, stores them, answers regulators.
#[derive(Debug, Parser)]
#[command(name = "sov-collector", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "SOV_LOG_FORMAT"
    )]
    log_format: LogFormat,
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
    },
    /// Certificates for the collector, agents, regulators and admins (no openssl needed).
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// All-in-one quickstart: a collector on embedded SQLite plus an agent for this host.
    Dev(crate::dev::DevArgs),
    /// Geolocation: where the collector places addresses, and which database said so.
    Geo {
        #[command(subcommand)]
        command: GeoCommand,
    },
    /// The jurisdiction policy file.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// API tokens for the HTTPS API (tools that cannot hold a client certificate).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Check the audit log's hash chain from its first record: prints the record count and
    /// the last hash (exit 0), or the first bad record and why (exit 1).
    VerifyAudit {
        /// Configuration file (TOML) naming the store.
        #[arg(long, short, env = "SOV_COLLECTOR_CONFIG")]
        config: PathBuf,
    },
    /// One-time enrollment tokens for `sov-agent enroll`.
    EnrollToken {
        #[command(subcommand)]
        command: EnrollTokenCommand,
    },
    /// Check the breach log's hash chain from its first record: prints the record count and
    /// the last hash (exit 0), or the first bad record and why (exit 1).
    VerifyLog {
        /// Configuration file (TOML) naming the store.
        #[arg(long, short, env = "SOV_COLLECTOR_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// List the tokens (id, name, role, created, expires; never the tokens themselves).
    List {
        /// Configuration file (TOML) naming the store.
        #[arg(long, short, env = "SOV_COLLECTOR_CONFIG")]
        config: PathBuf,
    },
    /// Revoke a token by its id (as `token create` and `token list` print it): it stops
    /// working at once.
    Revoke {
        /// Configuration file (TOML) naming the store.
        #[arg(long, short, env = "SOV_COLLECTOR_CONFIG")]
        config: PathBuf,
        /// The token's id (12 hex digits).
        id: String,
    },
    /// Make a token, store its hash, and print the token once (it cannot be shown again).
    Create {
        /// Configuration file (TOML) naming the store.
        #[arg(long, short, env = "SOV_COLLECTOR_CONFIG")]
        config: PathBuf,
        /// The role the token acts with: regulator or admin (agent tokens are refused by every route).
        #[arg(long)]
        role: Role,
        /// How long it works: a number and s, m, h or d (e.g. 30d), at most 732d.
        #[arg(long, value_parser = sov_evidence::view::parse_duration_ms)]
        expires: i64,
        /// What it is for (shown in `token create`'s output; free text).
        #[arg(long, default_value = "")]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum EnrollTokenCommand {
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
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy file: print every problem (exit 64), or a summary and any warnings.
    Check {
        /// Policy file (TOML).
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum GeoCommand {
    /// Print the country, ASN, organisation and source of each address.
    Lookup {
        /// Collector configuration whose [geo] section to use (default: the embedded table).
        #[arg(long, short, env = "SOV_COLLECTOR_CONFIG")]
        config: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        output: GeoOutput,
        /// Addresses (IPv4 or IPv6).
        #[arg(required = true)]
        ips: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
enum GeoOutput {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
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

/// Print a configuration error and exit with 64.
fn report_config_error(err: &ConfigError) -> ExitCode {
    sov_common::cli::report_config_error("sov-collector", err)
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("sov-collector: cannot start runtime: {e}");
            ExitCode::FAILURE
        })
}

fn fail(err: &dyn std::error::Error) -> ExitCode {
    let chain = source_chain(err);
    if chain.is_empty() {
        eprintln!("sov-collector: {err}");
    } else {
        eprintln!("sov-collector: {err}: {chain}");
    }
    ExitCode::FAILURE
}

/// Run `serve` with a loaded configuration until `shutdown`.
pub async fn serve(config: CollectorConfig) -> Result<(), anyhow::Error> {
    let store = crate::store::open(&config.store.url, &config.data_dir).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    crate::app::run(&config, store, listener, shutdown_signal()).await?;
    Ok(())
}

/// `policy check FILE`: the summary and warnings on stdout (exit 0), or every problem on
/// stderr (exit 64).
fn policy_check(file: &std::path::Path) -> ExitCode {
    match crate::policy::Policy::load(file) {
        Ok(policy) => {
            let mut out = format!(
                "{}: policy is valid ({})\n",
                file.display(),
                policy.summary()
            );
            for w in policy.warnings() {
                out.push_str(&format!("{}: warning: {w}\n", file.display()));
            }
            print_stdout(&out)
        }
        Err(e) => {
            eprintln!("sov-collector: {e}");
            ExitCode::from(EXIT_BAD_CONFIG as u8)
        }
    }
}

/// `token create`: make a token, store its record, print the token once.
fn token_create(config: &std::path::Path, role: Role, expires_ms: i64, name: &str) -> ExitCode {
    let cfg = match CollectorConfig::load(config) {
        Ok(c) => c,
        Err(e) => return report_config_error(&e),
    };
    let now = sov_common::clock::now_unix_ms();
    let (token, record) = match crate::token::generate(role, name, now, expires_ms) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let stored = rt.block_on(async {
        let store = crate::store::open(&cfg.store.url, &cfg.data_dir).await?;
        store.insert_token(record.clone()).await
    });
    if let Err(e) = stored {
        return fail(&e);
    }
    eprintln!(
        "token {} for role {} expires {}; it is shown once, keep it secret",
        record.token_id,
        record.role,
        sov_evidence::view::rfc3339(record.expires_unix_ms)
    );
    print_stdout(&format!("{token}\n"))
}

/// Open the store a configuration names, on a fresh runtime, and run `f` on it.
fn with_store<T>(
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

/// `token list`: one line per token.
fn token_list(config: &std::path::Path) -> ExitCode {
    let tokens = match with_store(config, async |s| s.list_tokens().await) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let now = sov_common::clock::now_unix_ms();
    let rows: Vec<serde_json::Value> = tokens
        .iter()
        .map(|t| {
            serde_json::json!({
                "id": t.token_id,
                "name": t.name,
                "role": t.role.as_str(),
                "created": sov_evidence::view::rfc3339(t.created_unix_ms),
                "expires": sov_evidence::view::rfc3339(t.expires_unix_ms),
                "state": if t.expires_unix_ms <= now { "expired" } else { "active" },
            })
        })
        .collect();
    print_stdout(&sov_evidence::view::table(
        &rows,
        &["id", "name", "role", "created", "expires", "state"],
    ))
}

/// `token revoke ID`.
fn token_revoke(config: &std::path::Path, id: &str) -> ExitCode {
    match with_store(config, async |s| s.delete_token(id).await) {
        Ok(true) => print_stdout(&format!("token {id} revoked\n")),
        Ok(false) => {
            eprintln!("sov-collector: no token with id {id:?} (see token list)");
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

/// Which hash chain `verify-log` / `verify-audit` checks.
#[derive(Debug, Clone, Copy)]
enum Chain {
    Breaches,
    Audit,
}

/// `verify-log` / `verify-audit`: open the configured store and check the chain.
fn verify_chain(config: &std::path::Path, chain: Chain) -> ExitCode {
    let cfg = match CollectorConfig::load(config) {
        Ok(c) => c,
        Err(e) => return report_config_error(&e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let verdict = rt.block_on(async {
        let store = crate::store::open(&cfg.store.url, &cfg.data_dir).await?;
        match chain {
            Chain::Breaches => crate::store::verify_store_log(store.as_ref()).await,
            Chain::Audit => crate::store::verify_store_audit(store.as_ref()).await,
        }
    });
    match verdict {
        Ok(v) => {
            let code = print_stdout(&format!("{}\n", v.message()));
            match v {
                sov_evidence::chain::LogVerdict::Verified { .. } => code,
                sov_evidence::chain::LogVerdict::Broken(_) => ExitCode::FAILURE,
            }
        }
        Err(e) => fail(&e),
    }
}

/// `enroll-token create`: store the hashes, print the CA's sha256 and the tokens.
fn enroll_token_create(config: &std::path::Path, count: u32, expires: &str) -> ExitCode {
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
        crate::enroll::create_tokens(
            store.as_ref(),
            count,
            lifetime,
            sov_common::clock::now_unix_ms(),
        )
        .await
    });
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

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Serve {
            config,
            check_config,
        } => {
            let cfg = match CollectorConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return report_config_error(&e),
            };
            if check_config {
                println!("{}: configuration is valid", config.display());
                return ExitCode::SUCCESS;
            }
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(serve(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e.as_ref()),
            }
        }
        Command::Pki { command } => match command {
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
        },
        Command::Geo {
            command:
                GeoCommand::Lookup {
                    config,
                    output,
                    ips,
                },
        } => match geo::lookup_command(config.as_deref(), &ips, output == GeoOutput::Json) {
            Ok(text) => print_stdout(&text),
            Err(e) => {
                eprintln!("sov-collector: {e}");
                ExitCode::from(EXIT_BAD_CONFIG as u8)
            }
        },
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => policy_check(&file),
        Command::VerifyLog { config } => verify_chain(&config, Chain::Breaches),
        Command::VerifyAudit { config } => verify_chain(&config, Chain::Audit),
        Command::Token {
            command:
                TokenCommand::Create {
                    config,
                    role,
                    expires,
                    name,
                },
        } => token_create(&config, role, expires, &name),
        Command::Token {
            command: TokenCommand::List { config },
        } => token_list(&config),
        Command::Token {
            command: TokenCommand::Revoke { config, id },
        } => token_revoke(&config, &id),
        Command::EnrollToken {
            command:
                EnrollTokenCommand::Create {
                    config,
                    count,
                    expires,
                },
        } => enroll_token_create(&config, count, expires.as_str()),
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
