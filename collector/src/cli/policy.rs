//! `sov-collector policy check FILE`: validate a jurisdiction policy file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use sov_common::cli::print_stdout;
use sov_common::config::EXIT_BAD_CONFIG;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file: print every problem (exit 64), or a summary and any warnings.
    Check {
        /// Policy file (TOML).
        file: PathBuf,
    },
}

/// Run one `policy` command.
pub(super) fn run(command: PolicyCommand) -> ExitCode {
    match command {
        PolicyCommand::Check { file } => policy_check(&file),
    }
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
