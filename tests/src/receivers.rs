//! Alert receivers on loopback: a hand-written HTTP/1.1 server (webhook, Alertmanager, Slack)
//! that records every request, and a TCP syslog listener that splits RFC 6587 octet-counted
//! frames.

use std::collections::HashMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// One request a receiver got.
#[derive(Debug)]
pub struct HttpRequest {
    /// Request line, e.g. `POST /api/v2/alerts HTTP/1.1`.
    pub line: String,
    /// Headers, names in lower case.
    pub headers: HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The body as JSON (panics when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

/// An HTTP/1.1 receiver on 127.0.0.1 answering every request with `status`: its URL and the
/// requests, in arrival order.
pub async fn http_receiver(status: u16) -> (String, mpsc::Receiver<HttpRequest>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    (url, http_receiver_on(listener, status))
}

/// [`http_receiver`] on a listener the caller bound (e.g. on a port given out earlier).
pub fn http_receiver_on(listener: TcpListener, status: u16) -> mpsc::Receiver<HttpRequest> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(req) = read_request(&mut s).await {
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 9\r\nConnection: close\r\n\r\nsee body."
                    );
                    if s.write_all(answer.as_bytes()).await.is_ok() {
                        let _ = s.shutdown().await;
                        let _ = tx.send(req).await;
                    }
                }
            });
        }
    });
    rx
}

/// How a [`flaky_http_receiver`] behaves now: read each request, then never answer (hang), or
/// answer with this status.
pub const HANG: u16 = 0;

/// An HTTP/1.1 receiver whose behaviour the test changes while it runs: `mode` is [`HANG`]
/// (read the request, hold the connection, never answer) or the status to answer. Every
/// request comes out with the status it got (`HANG` for one left hanging), in arrival order.
pub async fn flaky_http_receiver(
    mode: std::sync::Arc<std::sync::atomic::AtomicU16>,
) -> (String, mpsc::Receiver<(u16, HttpRequest)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            let mode = mode.clone();
            tokio::spawn(async move {
                let Some(req) = read_request(&mut s).await else {
                    return;
                };
                let status = mode.load(std::sync::atomic::Ordering::SeqCst);
                if status == HANG {
                    let _ = tx.send((HANG, req)).await;
                    // Hold the connection until the client gives up.
                    let mut sink = [0u8; 64];
                    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                    return;
                }
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: 9\r\nConnection: close\r\n\r\nsee body."
                );
                if s.write_all(answer.as_bytes()).await.is_ok() {
                    let _ = s.shutdown().await;
                    let _ = tx.send((status, req)).await;
                }
            });
        }
    });
    (url, rx)
}

async fn read_request(s: &mut tokio::net::TcpStream) -> Option<HttpRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let line = lines.next()?.to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect();
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = buf[end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(HttpRequest {
        line,
        headers,
        body,
    })
}

/// A TCP syslog listener on 127.0.0.1: its `tcp://` address and each message received
/// (RFC 6587 octet counting: `LEN SP MSG`).
pub async fn syslog_tcp_receiver() -> (String, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = format!("tcp://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // Split every complete frame out of what has arrived.
                    while let Some(sp) = all.iter().position(|b| *b == b' ') {
                        let Some(len) = std::str::from_utf8(&all[..sp])
                            .ok()
                            .and_then(|t| t.parse::<usize>().ok())
                        else {
                            return;
                        };
                        if all.len() < sp + 1 + len {
                            break;
                        }
                        let msg = String::from_utf8_lossy(&all[sp + 1..sp + 1 + len]).into_owned();
                        all.drain(..sp + 1 + len);
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => all.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, rx)
}
