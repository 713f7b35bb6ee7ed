//! `sov-collector token create|list|revoke`: API tokens for the HTTPS API ([`crate::token`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use sov_common::cli::print_stdout;

use super::{fail, report_config_error, runtime, with_store};
use crate::auth::Role;
use crate::config::CollectorConfig;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
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

/// Run one `token` command.
pub(super) fn run(command: TokenCommand) -> ExitCode {
    match command {
        TokenCommand::Create {
            config,
            role,
            expires,
            name,
        } => token_create(&config, role, expires, &name),
        TokenCommand::List { config } => token_list(&config),
        TokenCommand::Revoke { config, id } => token_revoke(&config, &id),
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
