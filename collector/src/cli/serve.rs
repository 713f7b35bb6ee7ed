//! `sov-collector serve --config FILE [--check-config]`: the collector until SIGINT or SIGTERM.

use std::path::Path;
use std::process::ExitCode;

use sov_common::cli::shutdown_signal;

use super::{fail, report_config_error, runtime};
use crate::config::CollectorConfig;

/// Run `serve` with a loaded configuration until `shutdown`.
pub async fn serve(config: CollectorConfig) -> Result<(), anyhow::Error> {
    let store = crate::store::open(&config.store.url, &config.data_dir).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    crate::app::run(&config, store, listener, shutdown_signal()).await?;
    Ok(())
}

/// `serve`: load and check the configuration; with `check_config` stop there, else serve.
pub(super) fn run(config: &Path, check_config: bool) -> ExitCode {
    let cfg = match CollectorConfig::load(config) {
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
