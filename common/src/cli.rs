//! What every command line of the project does the same way: the log format and tracing
//! set-up, one shutdown signal, configuration errors with exit code 64, and writing to stdout.

use std::process::ExitCode;

use crate::config::{ConfigError, EXIT_BAD_CONFIG};

/// Log output format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The `--log-format` flag every binary takes (global, also `SOV_LOG_FORMAT`); flatten it into
/// a command line with `#[command(flatten)]`.
#[derive(Debug, Clone, clap::Args)]
pub struct Logging {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "SOV_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

impl Logging {
    /// Install the tracing subscriber in this format ([`init_tracing`]).
    pub fn init(&self) {
        init_tracing(self.log_format);
    }
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

/// Print a configuration error of `program` and choose the exit code (64).
pub fn report_config_error(program: &str, err: &ConfigError) -> ExitCode {
    eprintln!("{program}: {err}");
    ExitCode::from(EXIT_BAD_CONFIG as u8)
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
