//! `sov-collector verify-log` and `verify-audit`: check a hash chain of the configured store
//! from its first record.

use std::process::ExitCode;

use sov_common::cli::print_stdout;

use super::{fail, report_config_error, runtime};
use crate::config::CollectorConfig;

/// Which hash chain `verify-log` / `verify-audit` checks.
#[derive(Debug, Clone, Copy)]
pub(super) enum Chain {
    Breaches,
    Audit,
}

/// `verify-log` / `verify-audit`: open the configured store and check the chain.
pub(super) fn run(config: &std::path::Path, chain: Chain) -> ExitCode {
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
