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
        .with_writer(|| SafeLines(std::io::stderr()));
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A log writer that keeps one event on one line, whatever the text it carries came from (a
/// node's process, model or file names): a newline or carriage return inside an event, other
/// C0 control characters (but the tab, and the ESC of the formatter's colours: tracing already
/// escapes an ESC in field values) and the bidirectional overrides and isolates are written as
/// escapes, so that nobody can forge or hide a log line. The formatter writes each event with
/// one `write_all`, ending in its one newline.
#[derive(Debug)]
pub struct SafeLines<W>(pub W);

impl<W: std::io::Write> std::io::Write for SafeLines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(&escape_log_bytes(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// [`SafeLines`]'s escaping of one event.
pub fn escape_log_bytes(buf: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let bidi = |i: usize| -> Option<u32> {
        match (buf.get(i)?, buf.get(i + 1)?, buf.get(i + 2)?) {
            (0xe2, 0x80, b @ (0x8e | 0x8f | 0xaa..=0xae)) => Some(0x2000 + u32::from(*b - 0x80)),
            (0xe2, 0x81, b @ 0xa6..=0xa9) => Some(0x2040 + u32::from(*b - 0x80)),
            _ => None,
        }
    };
    let last = buf.len().saturating_sub(1);
    let clean = buf.iter().enumerate().all(|(i, &b)| {
        (b >= 0x20 || b == b'\t' || b == 0x1b || (b == b'\n' && i == last))
            && b != 0x7f
            && bidi(i).is_none()
    });
    if clean {
        return std::borrow::Cow::Borrowed(buf);
    }
    let mut out = Vec::with_capacity(buf.len() + 16);
    let mut i = 0;
    while i < buf.len() {
        let b = buf[i];
        if let Some(cp) = bidi(i) {
            out.extend_from_slice(format!("\\u{{{cp:x}}}").as_bytes());
            i += 3;
            continue;
        }
        match b {
            b'\n' if i == last => out.push(b),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' | 0x1b => out.push(b),
            b if b < 0x20 || b == 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            b => out.push(b),
        }
        i += 1;
    }
    std::borrow::Cow::Owned(out)
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

#[cfg(test)]
mod log_tests {
    use super::*;

    #[test]
    fn a_log_event_stays_one_line_whatever_its_fields_hold() {
        let event = "WARN node=n1 process=\"a\nWARN forged line\rb\u{202e}c\u{7}\" x\n";
        let out = String::from_utf8(escape_log_bytes(event.as_bytes()).into_owned()).unwrap();
        assert_eq!(
            out,
            "WARN node=n1 process=\"a\\nWARN forged line\\rb\\u{202e}c\\x07\" x\n"
        );
        assert_eq!(out.lines().count(), 1);
        let plain = "INFO \u{1b}[32mok\u{1b}[0m été\n";
        assert!(matches!(
            escape_log_bytes(plain.as_bytes()),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
