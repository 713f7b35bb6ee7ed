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
pub(super) fn run(config: &Path, check_config: bool, allow_insecure_keys: bool) -> ExitCode {
    if check_config {
        return check(config, allow_insecure_keys);
    }
    let cfg = match CollectorConfig::load_for_serving(config, allow_insecure_keys) {
        Ok(c) => c,
        Err(e) => return report_config_error(&e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(serve(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.as_ref()),
    }
}

/// `serve --check-config`: every problem of the file, then of its certificate files (dates,
/// key, chain), at once; exit 64 when any. A collector certificate from another CA than
/// `[tls] ca` (the clients' CA) is noted, not refused.
fn check(config: &Path, allow_insecure_keys: bool) -> ExitCode {
    use sov_common::config::{ConfigError, Problems};
    use sov_common::tls_diagnose::{CertFiles, Side, check_files};
    let cfg: CollectorConfig = match sov_common::config::read_toml(config) {
        Ok(c) => c,
        Err(e) => return report_config_error(&e),
    };
    let mut problems = match CollectorConfig::load_for_serving(config, allow_insecure_keys) {
        Ok(_) => Problems::default(),
        Err(ConfigError::Invalid(p)) => p,
        Err(e) => return report_config_error(&e),
    };
    let mut notes = Vec::new();
    let t = &cfg.tls;
    if [&t.ca, &t.cert, &t.key]
        .iter()
        .all(|p| std::fs::File::open(p).is_ok())
    {
        check_files(
            &mut problems,
            Some(&mut notes),
            "tls",
            CertFiles {
                ca: &t.ca,
                cert: &t.cert,
                key: &t.key,
            },
            Side::Server,
            rustls::pki_types::UnixTime::now(),
        );
    }
    for n in &notes {
        eprintln!("sov-collector: note: {n}");
    }
    if problems.is_empty() {
        println!("{}: configuration is valid", config.display());
        ExitCode::SUCCESS
    } else {
        report_config_error(&ConfigError::Invalid(problems))
    }
}
