//! The `sov-agent` command line: `run --config FILE`, `--check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sov_common::cli::{Logging, print_stdout, shutdown_signal};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ConfigError, EXIT_BAD_CONFIG};

/// Print a configuration error and choose the exit code.
pub fn report_config_error(err: &ConfigError) -> ExitCode {
    sov_common::cli::report_config_error("sov-agent", err)
}

/// `run --check-config`: every problem of the file, then of its certificate files (dates, key,
/// chain to the CA), at once; exit 64 when any.
fn check_config_file(config: &std::path::Path, allow_insecure_keys: bool) -> ExitCode {
    let cfg: AgentConfig = match sov_common::config::read_toml(config) {
        Ok(c) => c,
        Err(e) => return report_config_error(&e),
    };
    let mut problems = match AgentConfig::load_with(config, allow_insecure_keys) {
        Ok(_) => sov_common::config::Problems::default(),
        Err(ConfigError::Invalid(p)) => p,
        Err(e) => return report_config_error(&e),
    };
    cfg.check_certificates(&mut problems);
    if problems.is_empty() {
        println!("{}: configuration is valid", config.display());
        ExitCode::SUCCESS
    } else {
        report_config_error(&ConfigError::Invalid(problems))
    }
}

/// Sovereign node agent: observes this node and reports to the collector over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "sov-agent", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    logging: Logging,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, env = "SOV_AGENT_CONFIG")]
        config: PathBuf,
        /// Validate the configuration, print every problem, and exit (64 when invalid).
        #[arg(long)]
        check_config: bool,
        /// Run even when `[tls] key` is readable by group or others (refused by default, as
        /// ssh refuses such keys); a warning is logged instead.
        #[arg(long)]
        allow_insecure_keys: bool,
    },
    /// Get this node's certificate from the collector with a one-time token: the key is made
    /// here and never leaves the node. Writes `[tls] key`, `ca` and `cert` of the configuration.
    Enroll {
        /// Configuration file: the node name and the `[tls]` paths to write.
        #[arg(long, short, env = "SOV_AGENT_CONFIG")]
        config: PathBuf,
        /// Collector URL (default: the configuration's first `collector`).
        #[arg(long)]
        collector: Option<String>,
        /// One-time token from `sov-collector enroll-token create`.
        #[arg(long, env = "SOV_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// sha256 of the collector's CA certificate (DER), as `enroll-token create` prints it.
        #[arg(long = "ca-sha256")]
        ca_sha256: String,
    },
    /// Print one snapshot of everything the agent sees now (no collector needed).
    Scan {
        /// Configuration file; [processes] (with [processes.containers]), [gpu], [budget],
        /// [weights] and [net] are used. Default: defaults.
        #[arg(long, short, env = "SOV_AGENT_CONFIG")]
        config: Option<PathBuf>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Milliseconds between the two observations that CPU shares are measured over.
        #[arg(long, default_value_t = 1000)]
        window_ms: u64,
        /// Do not fingerprint weight files (sha256); faster on large models.
        #[arg(long)]
        no_hash: bool,
    },
}

fn scan(config: Option<&std::path::Path>, json: bool, window_ms: u64, hash: bool) -> ExitCode {
    let cfg = match config {
        Some(path) => match crate::config::read_toml::<AgentConfig>(path) {
            Ok(cfg) => Some(cfg),
            Err(e) => return report_config_error(&e),
        },
        None => None,
    };
    let mut observer = match &cfg {
        Some(c) => crate::observe::Observer::from_config(c),
        None => crate::observe::Observer::from_config_sections(
            &Default::default(),
            &Default::default(),
            &Default::default(),
        ),
    };
    // Who each container is, asked once before anything is described.
    let containers = observer.containers();
    containers.refresh();
    // Flows: a baseline now, the traffic until the end of the window.
    let ncfg = cfg.as_ref().map(|c| c.net.clone()).unwrap_or_default();
    let mut net = ncfg
        .enabled
        .then(|| crate::collect::net::NetCollector::new(&ncfg).with_containers(containers.clone()));
    if let Some(n) = &mut net {
        n.sample(crate::collect::net::now_unix_ms());
    }
    let wcfg = cfg.as_ref().map(|c| c.weights.clone()).unwrap_or_default();
    let (mut weights, errors) = if wcfg.enabled {
        scan_weights(cfg.as_ref(), wcfg, hash, &containers)
    } else {
        (vec![], vec![])
    };
    let (obs, info) =
        crate::scan::snapshot(&mut observer, std::time::Duration::from_millis(window_ms));
    crate::collect::weights::inventory::link_gpus(&mut weights, &obs.gpu.devices);
    let (flows, net_status) = match &mut net {
        Some(n) => {
            n.sample(crate::collect::net::now_unix_ms());
            n.take()
        }
        None => Default::default(),
    };
    let text = if json {
        let mut v = crate::scan::to_json_with_weights(&obs, &info, &weights, &errors);
        crate::scan::add_flows(&mut v, &flows, &net_status);
        match serde_json::to_string_pretty(&v) {
            Ok(text) => text + "\n",
            Err(e) => {
                eprintln!("sov-agent: cannot encode JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        crate::scan::to_table(&obs, &info) + &crate::scan::weights_table(&weights, &errors)
    };
    print_stdout(&text)
}

/// One synchronous weights pass for `scan`, fingerprinting with a progress line on stderr.
fn scan_weights(
    cfg: Option<&AgentConfig>,
    wcfg: crate::config::WeightsConfig,
    hash: bool,
    containers: &crate::collect::containers::Containers,
) -> (Vec<sov_proto::pb::WeightFile>, Vec<(String, String)>) {
    use crate::collect::weights::inventory::{WeightsHandle, WeightsScanner};
    // The fingerprint cache: the agent's state directory when a config names one, else the
    // user's cache directory, so repeated scans do not hash again.
    let state_dir = wcfg
        .state_dir
        .clone()
        .or_else(|| cfg.and_then(|c| c.spool_dir.parent().map(std::path::Path::to_path_buf)))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sov-agent")))
        .unwrap_or_else(std::env::temp_dir);
    let handle = WeightsHandle::default();
    let mut scanner =
        WeightsScanner::new(wcfg, &state_dir, handle.clone()).with_containers(containers.clone());
    let left = scanner.scan_until_done(64);
    if left > 0 {
        eprintln!(
            "{left} files mapped by processes were not examined (64 passes of \
             weights.max_new_files_per_scan); raise it to examine them in one scan"
        );
    }
    scanner.refresh_users();
    if hash {
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let mut last = std::time::Instant::now();
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        scanner.hash_pending(&cancel, &mut |path, done, total| {
            if last.elapsed() >= std::time::Duration::from_millis(500) || done == total {
                last = std::time::Instant::now();
                let pct = (done * 100).checked_div(total).unwrap_or(100);
                if tty {
                    eprint!("\rhashing {path}: {pct}%   ");
                } else {
                    eprintln!("hashing {path}: {pct}%");
                }
            }
        });
        if tty {
            eprintln!();
        }
    }
    (handle.files(), handle.errors())
}

/// `enroll`: check the configuration (its TLS files may not exist yet), then enroll.
fn enroll(config: &std::path::Path, collector: Option<String>, token: &str, pin: &str) -> ExitCode {
    let cfg = match crate::config::read_toml::<AgentConfig>(config) {
        Ok(c) => c,
        Err(e) => return report_config_error(&e),
    };
    let mut problems = cfg.validate();
    // The files enrollment is about to write are allowed to be missing.
    problems.0.retain(|p| {
        !(p.starts_with("tls.ca:") || p.starts_with("tls.cert:") || p.starts_with("tls.key:"))
    });
    if let Err(e) = problems.into_result() {
        return report_config_error(&e);
    }
    let Some(url) = collector.or_else(|| cfg.collector.first().cloned()) else {
        eprintln!("sov-agent: no collector URL: pass --collector");
        return ExitCode::from(EXIT_BAD_CONFIG as u8);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sov-agent: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let node = cfg.node_name();
    let files = crate::enroll::EnrollFiles {
        ca: cfg.tls.ca.clone(),
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
    };
    match rt.block_on(crate::enroll::enroll(
        &url,
        cfg.tls.server_name.as_deref(),
        token,
        pin,
        &node,
        &files,
    )) {
        Ok(done) => print_stdout(&format!(
            "enrolled node {node:?} at {url}\ncertificate: {}\nkey:         {}\nCA:          {}\nexpires at {} (Unix ms); the agent renews it itself\n",
            files.cert.display(),
            files.key.display(),
            files.ca.display(),
            done.not_after_unix_ms
        )),
        Err(e) => {
            let chain = crate::run::source_chain(&e);
            if chain.is_empty() {
                eprintln!("sov-agent: enrollment failed: {e}");
            } else {
                eprintln!("sov-agent: enrollment failed: {e}: {chain}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.logging.init();
    match cli.command {
        Command::Scan {
            config,
            json,
            window_ms,
            no_hash,
        } => scan(config.as_deref(), json, window_ms, !no_hash),
        Command::Enroll {
            config,
            collector,
            token,
            ca_sha256,
        } => enroll(&config, collector, &token, &ca_sha256),
        Command::Run {
            config,
            check_config,
            allow_insecure_keys,
        } => {
            if check_config {
                return check_config_file(&config, allow_insecure_keys);
            }
            let cfg = match AgentConfig::load_with(&config, allow_insecure_keys) {
                Ok(c) => c,
                Err(e) => return report_config_error(&e),
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("sov-agent: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async move {
                let agent = match crate::Agent::open(cfg) {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("sov-agent: {e}: {}", crate::run::source_chain(&e));
                        return ExitCode::FAILURE;
                    }
                };
                let shutdown = CancellationToken::new();
                let trigger = shutdown.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    tracing::info!("shutting down");
                    trigger.cancel();
                });
                match agent.run(shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("sov-agent: {e}: {}", crate::run::source_chain(&e));
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}
