//! Prometheus text exposition (format 0.0.4) over a tiny HTTP/1.1 server on a tokio listener
//! (no HTTP dependency), shared by the agent's and the collector's `[metrics] listen`:
//! `GET /metrics` answers 200 with what the caller renders; anything else 404. One request per
//! connection, the request head read with a size limit ([`MAX_REQUEST_HEAD`]) and a deadline
//! ([`READ_TIMEOUT`]), at most [`MAX_CONNECTIONS`] connections at once. Also the helpers both
//! expositions use ([`family`], [`ProcessStats`]).

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Largest request head (request line and headers) read, bytes.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Longest a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a client may take to read the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Linux USER_HZ: the unit of utime/stime in /proc/self/stat on every mainstream architecture.
const TICKS_PER_SEC: f64 = 100.0;

/// Write the `# HELP` and `# TYPE` lines of a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The standard `process_resident_memory_bytes` and `process_cpu_seconds_total` families.
pub fn process_families(out: &mut String, p: ProcessStats) {
    family(
        out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    );
    let _ = writeln!(
        out,
        "process_resident_memory_bytes {}",
        p.resident_memory_bytes
    );
    family(
        out,
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
    );
    let _ = writeln!(out, "process_cpu_seconds_total {}", p.cpu_seconds);
}

/// This process's resources, from `/proc/self`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// Resident memory, bytes.
    pub resident_memory_bytes: u64,
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
}

impl ProcessStats {
    /// Read `/proc/self/status` and `/proc/self/stat`; `None` where they cannot be read.
    pub fn read() -> Option<Self> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may contain spaces:
        // they start at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
        let mut rest = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
        let utime: u64 = rest.next()?.parse().ok()?;
        let stime: u64 = rest.next()?.parse().ok()?;
        Some(Self {
            resident_memory_bytes: rss_kib.saturating_mul(1024),
            cpu_seconds: (utime + stime) as f64 / TICKS_PER_SEC,
        })
    }
}

/// Serve `/metrics` on `listener` until `shutdown` completes. Connections in progress finish
/// on their own (each is bounded by [`READ_TIMEOUT`] and [`WRITE_TIMEOUT`]).
///
/// `render` makes the body of each `GET /metrics` answer; `who` names the program in logs.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    who: &'static str,
    render: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = String> + Send,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    tracing::info!(listen = ?listener.local_addr().ok(), "{who} serving /metrics over plain HTTP");
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %err, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let render = render.clone();
        tokio::spawn(async move {
            if let Err(err) = handle(stream, render).await {
                tracing::debug!(%peer, error = %err, "metrics: connection ended");
            }
            drop(permit);
        });
    }
    tracing::info!("metrics endpoint stopped");
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    /// `GET /metrics`.
    Metrics,
    /// Any other method or path.
    NotFound,
    /// Not an HTTP/1.x request line.
    Bad,
}

/// Parse the request line of a complete head.
fn parse_request(head: &[u8]) -> Asked {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return Asked::Bad;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Asked::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Asked::Bad;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if method == "GET" && path == "/metrics" {
        Asked::Metrics
    } else {
        Asked::NotFound
    }
}

/// Read the request head (up to the blank line); `None` when it exceeds [`MAX_REQUEST_HEAD`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // Search only where the terminator can newly appear.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(head));
        }
        if head.len() >= MAX_REQUEST_HEAD {
            return Ok(None);
        }
    }
}

/// Answer one request, then close.
async fn handle<F, Fut>(mut stream: TcpStream, render: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let (status, body) = match head.as_deref().map(parse_request) {
        None => ("431 Request Header Fields Too Large", String::new()),
        Some(Asked::Bad) => ("400 Bad Request", String::new()),
        Some(Asked::NotFound) => ("404 Not Found", "not found; try /metrics\n".to_owned()),
        Some(Asked::Metrics) => ("200 OK", render().await),
    };
    let content_type = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn this_process_reads_its_own_memory_and_cpu() {
        let p = ProcessStats::read().unwrap();
        assert!(p.resident_memory_bytes > 1024 * 1024, "{p:?}");
        assert!(p.cpu_seconds >= 0.0, "{p:?}");
    }

    #[test]
    fn request_lines_are_routed() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Asked::NotFound
        );
        assert_eq!(
            parse_request(b"GET /metricsx HTTP/1.1\r\n\r\n"),
            Asked::NotFound
        );
        assert_eq!(parse_request(b"GET /metrics\r\n\r\n"), Asked::Bad);
        assert_eq!(parse_request(b"GET /metrics SPDY/3\r\n\r\n"), Asked::Bad);
        assert_eq!(parse_request(b"\xff\xfe\r\n\r\n"), Asked::Bad);
    }
}
