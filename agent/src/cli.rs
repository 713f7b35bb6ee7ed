//! The `sov-agent` command line: `run --config FILE`, `--check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ConfigError, EXIT_BAD_CONFIG};

/// Sovereign node agent: observes this node and reports to the collector over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "sov-agent", version)]
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
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, env = "SOV_AGENT_CONFIG")]
        config: PathBuf,
        /// Validate the configuration, print every problem, and exit (64 when invalid).
        #[arg(long)]
        check_config: bool,
    },
    /// Print one snapshot of everything the agent sees now (no collector needed).
    Scan {
        /// Configuration file; only [processes], [gpu] and [budget] are used. Default: defaults.
        #[arg(long, short, env = "SOV_AGENT_CONFIG")]
        config: Option<PathBuf>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Milliseconds between the two observations that CPU shares are measured over.
        #[arg(long, default_value_t = 1000)]
        window_ms: u64,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Install the tracing subscriber; the filter comes from `RUST_LOG` (default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A future that completes on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Print a configuration error and choose the exit code.
pub fn report_config_error(err: &ConfigError) -> ExitCode {
    eprintln!("sov-agent: {err}");
    ExitCode::from(EXIT_BAD_CONFIG as u8)
}

fn scan(config: Option<&std::path::Path>, json: bool, window_ms: u64) -> ExitCode {
    let mut observer = match config {
        Some(path) => match crate::config::read_toml::<AgentConfig>(path) {
            Ok(cfg) => crate::observe::Observer::from_config(&cfg),
            Err(e) => return report_config_error(&e),
        },
        None => crate::observe::Observer::from_config_sections(
            &Default::default(),
            &Default::default(),
            &Default::default(),
        ),
    };
    let (obs, info) =
        crate::scan::snapshot(&mut observer, std::time::Duration::from_millis(window_ms));
    let text = if json {
        match serde_json::to_string_pretty(&crate::scan::to_json(&obs, &info)) {
            Ok(text) => text + "\n",
            Err(e) => {
                eprintln!("sov-agent: cannot encode JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        crate::scan::to_table(&obs, &info)
    };
    print_stdout(&text)
}

/// Write to stdout; a closed pipe (`| head`) is a normal end, not a crash.
pub fn print_stdout(text: &str) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Scan {
            config,
            json,
            window_ms,
        } => scan(config.as_deref(), json, window_ms),
        Command::Run {
            config,
            check_config,
        } => {
            let cfg = match AgentConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return report_config_error(&e),
            };
            if check_config {
                println!("{}: configuration is valid", config.display());
                return ExitCode::SUCCESS;
            }
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
