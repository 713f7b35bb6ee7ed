//! `sov-collector verify-log` and `verify-audit`: check a hash chain of the configured store
//! from its first record, and against every signed checkpoint of its head
//! ([`crate::checkpoint::verify`]): those in the store and those given with `--checkpoint`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sov_common::cli::print_stdout;
use sov_evidence::checkpoint::{AUDIT_LOG, BREACH_LOG, SignedCheckpoint, Trust};

use super::{fail, report_config_error, runtime};
use crate::checkpoint::Verdict;
use crate::config::CollectorConfig;

/// Which hash chain `verify-log` / `verify-audit` checks.
#[derive(Debug, Clone, Copy)]
pub(super) enum Chain {
    Breaches,
    Audit,
}

/// Why the collector's certificate or a checkpoint file could not be used.
#[derive(Debug, thiserror::Error)]
enum VerifyError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Checkpoint { path: String, reason: String },
}

/// Whose checkpoints count: the collector's certificate, and server certificates of its CA.
fn trust(cfg: &CollectorConfig) -> Result<Trust, VerifyError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| VerifyError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let cert = read(&cfg.tls.cert)?;
    let ca = read(&cfg.tls.ca)?;
    Trust::new(Some(&cert), Some(&ca)).map_err(|e| VerifyError::Checkpoint {
        path: cfg.tls.cert.display().to_string(),
        reason: e.to_string(),
    })
}

/// Every checkpoint of `log` in the files (each must hold at least one).
fn kept_elsewhere(files: &[PathBuf], log: &str) -> Result<Vec<SignedCheckpoint>, VerifyError> {
    let mut out = Vec::new();
    for path in files {
        let bad = |reason: String| VerifyError::Checkpoint {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|source| VerifyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let found = sov_evidence::checkpoint::find_in(&v, log);
        if found.is_empty() {
            return Err(bad(format!("holds no signed checkpoint of the {log}")));
        }
        for c in found {
            out.push(SignedCheckpoint::from_json(&c).map_err(|e| bad(e.to_string()))?);
        }
    }
    Ok(out)
}

/// `verify-log` / `verify-audit`: open the configured store and check the chain.
pub(super) fn run(config: &Path, chain: Chain, checkpoint_files: &[PathBuf]) -> ExitCode {
    let cfg = match CollectorConfig::load(config) {
        Ok(c) => c,
        Err(e) => return report_config_error(&e),
    };
    let log = match chain {
        Chain::Breaches => BREACH_LOG,
        Chain::Audit => AUDIT_LOG,
    };
    let (trust, elsewhere) =
        match trust(&cfg).and_then(|t| Ok((t, kept_elsewhere(checkpoint_files, log)?))) {
            Ok(x) => x,
            Err(e) => return fail(&e),
        };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let verdict = rt.block_on(async {
        let store = crate::store::open(&cfg.store.url, &cfg.data_dir).await?;
        crate::checkpoint::verify(store.as_ref(), log, &trust, elsewhere).await
    });
    match verdict {
        Ok(v) => {
            let code = print_stdout(&format!("{}\n", v.message()));
            match v {
                Verdict::Verified { .. } => code,
                Verdict::Broken(_) => ExitCode::FAILURE,
            }
        }
        Err(e) => fail(&e),
    }
}
