//! A small HTTP/1.1 client for the HTTP sinks: one POST per connection (`Connection: close`),
//! `http://` over TCP, `https://` over rustls (public roots, or a private CA file per sink).
//! Only the status line and a prefix of the body are read back.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{CONNECT_TIMEOUT, DeliveryError, REQUEST_TIMEOUT};

/// Most response bytes read (status line, headers and the start of the body).
const MAX_RESPONSE_BYTES: usize = 16 * 1024;
/// Most body bytes kept in [`DeliveryError::Status`].
const BODY_PREFIX_BYTES: usize = 256;
/// `User-Agent` sent.
const USER_AGENT: &str = concat!("sov-collector/", env!("CARGO_PKG_VERSION"));

/// Where one sink POSTs, parsed once from its URL.
#[derive(Clone)]
pub struct Endpoint {
    /// `https://`.
    pub https: bool,
    /// Host name or IP address (without brackets).
    pub host: String,
    /// Port (default 80 or 443).
    pub port: u16,
    /// Path and query, at least "/".
    pub path: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The path may hold a token (Slack's webhook URL is a secret): never print it.
        write!(
            f,
            "{}://{}:{}/…",
            if self.https { "https" } else { "http" },
            self.host,
            self.port
        )
    }
}

impl Endpoint {
    /// Parse `http[s]://host[:port][/path]` (an IPv6 host in brackets); no TLS set up yet.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(format!("{url:?}: user info in the URL is not supported"));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(r) = authority.strip_prefix('[') {
            let (h, after) = r
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed '[' in the host"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => parse_port(url, p)?,
                None if after.is_empty() => default_port,
                None => return Err(format!("{url:?}: bad host")),
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), parse_port(url, p)?),
                None => (authority.to_owned(), default_port),
            }
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{url:?}: missing or bad host"));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{url:?}: the path must not contain spaces"));
        }
        Ok(Self {
            https,
            host,
            port,
            path,
            tls: None,
        })
    }

    /// Parse `url` and, for https, prepare TLS trusting `ca` (PEM) or else the public roots.
    pub fn new(url: &str, ca: Option<&Path>) -> Result<Self, String> {
        let mut e = Self::parse(url)?;
        if e.https {
            e.tls = Some(client_tls(ca)?);
        }
        Ok(e)
    }

    /// The same endpoint with another path (Alertmanager appends `/api/v2/alerts`).
    pub fn with_path(mut self, path: String) -> Self {
        self.path = path;
        self
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// POST `body` as JSON with `headers`; Ok on a 2xx answer. Bounded by the connect and
    /// request timeouts.
    pub async fn post_json(
        &self,
        body: &[u8],
        headers: &[(&str, String)],
    ) -> Result<(), DeliveryError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.post_inner(body, headers))
            .await
            .map_err(|_| DeliveryError::Timeout("request"))?
    }

    async fn post_inner(
        &self,
        body: &[u8],
        headers: &[(&str, String)],
    ) -> Result<(), DeliveryError> {
        let addr = self.addr();
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| DeliveryError::Timeout("connect"))?
        .map_err(|source| DeliveryError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let default_port = if self.https { 443 } else { 80 };
        let host_header = if self.port != default_port {
            addr.clone()
        } else if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: {USER_AGENT}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.path,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(k);
            head.push_str(": ");
            head.push_str(v);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        match &self.tls {
            None => exchange(tcp, head.as_bytes(), body).await,
            Some(cfg) => {
                let name =
                    ServerName::try_from(self.host.clone()).map_err(|e| DeliveryError::Tls {
                        addr: addr.clone(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                    })?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|source| DeliveryError::Tls { addr, source })?;
                exchange(tls, head.as_bytes(), body).await
            }
        }
    }
}

fn parse_port(url: &str, p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{url:?}: bad port {p:?}")),
        Ok(n) => Ok(n),
    }
}

/// rustls client configuration trusting the PEM certificates in `ca`, or the public roots.
pub fn client_tls(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no PEM certificate", path.display()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Write the request, read the answer's status line (and a prefix of the body).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    head: &[u8],
    body: &[u8],
) -> Result<(), DeliveryError> {
    s.write_all(head).await.map_err(DeliveryError::Io)?;
    s.write_all(body).await.map_err(DeliveryError::Io)?;
    s.flush().await.map_err(DeliveryError::Io)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // Read until the headers and enough of the body are in, or the server closes.
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let want = content_length(&buf[..end]).unwrap_or(usize::MAX);
            if buf.len() - (end + 4) >= want.min(BODY_PREFIX_BYTES) {
                break;
            }
        }
        if buf.len() >= MAX_RESPONSE_BYTES {
            break;
        }
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A TLS peer that closes without close_notify: what was read is the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => break,
            Err(e) => return Err(DeliveryError::Io(e)),
        }
    }
    let code = status_code(&buf).ok_or_else(|| {
        DeliveryError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not an HTTP/1.x answer: {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(64)])
            ),
        ))
    })?;
    if (200..300).contains(&code) {
        return Ok(());
    }
    let body = find(&buf, b"\r\n\r\n").map_or(&[][..], |e| &buf[e + 4..]);
    let prefix = String::from_utf8_lossy(&body[..body.len().min(BODY_PREFIX_BYTES)])
        .trim()
        .to_owned();
    Err(DeliveryError::Status {
        code,
        body_prefix: prefix,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn status_code(buf: &[u8]) -> Option<u16> {
    let line_end = find(buf, b"\r\n")?;
    let line = std::str::from_utf8(&buf[..line_end]).ok()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

fn content_length(head: &[u8]) -> Option<usize> {
    let head = std::str::from_utf8(head).ok()?;
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rustls::pki_types::PrivateKeyDer;
    use tokio::net::TcpListener;

    #[test]
    fn urls_are_parsed_with_default_ports_paths_and_ipv6_hosts() {
        let e = Endpoint::parse("https://hooks.slack.com/services/T/B/X").unwrap();
        assert!(e.https);
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("hooks.slack.com", 443, "/services/T/B/X")
        );
        let e = Endpoint::parse("http://[::1]:9093").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("::1", 9093, "/")
        );
        let e = Endpoint::parse("http://h?x=1").unwrap();
        assert_eq!(e.path, "/?x=1");
        for bad in [
            "ftp://h",
            "http://",
            "http://h:0",
            "http://h:x",
            "http://u@h/",
            "http://h/a b",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
        assert!(!format!("{e:?}").contains("x=1"));
    }

    #[test]
    fn status_lines_and_lengths_are_read() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n\r\n"), Some(204));
        assert_eq!(status_code(b"HTTP/1.0 500\r\n"), Some(500));
        assert_eq!(status_code(b"SSH-2.0\r\n"), None);
        assert_eq!(
            content_length(b"HTTP/1.1 200 OK\r\ncontent-length: 12"),
            Some(12)
        );
    }

    /// https to a loopback server whose certificate chains to a private CA given as `ca`.
    #[tokio::test]
    async fn https_to_a_server_of_a_private_ca_is_trusted_through_the_sinks_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::pki::init(&dir.path().join("pki"), &[], "sovereign").unwrap();
        let certs = CertificateDer::pem_file_iter(&pki.collector.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&pki.collector.key).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut got = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !got.ends_with(b"{\"ok\":1}") {
                        let n = tls.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&chunk[..n]);
                    }
                    tls.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await
                    .unwrap();
                    let _ = tls.shutdown().await;
                    tx.send(got).await.unwrap();
                });
            }
        });

        let url = format!("https://localhost:{port}/hook");
        let e = Endpoint::new(&url, Some(&pki.ca_cert)).unwrap();
        e.post_json(b"{\"ok\":1}", &[("X-Test", "1".into())])
            .await
            .unwrap();
        let got = String::from_utf8(rx.recv().await.unwrap()).unwrap();
        assert!(got.starts_with("POST /hook HTTP/1.1\r\n"), "{got}");
        assert!(
            got.contains(&format!("Host: localhost:{port}\r\n")),
            "{got}"
        );
        assert!(
            got.contains("Content-Length: 8\r\n") && got.contains("X-Test: 1\r\n"),
            "{got}"
        );

        // By IP address too (the certificate carries 127.0.0.1).
        let e = Endpoint::new(
            &format!("https://127.0.0.1:{port}/hook"),
            Some(&pki.ca_cert),
        )
        .unwrap();
        e.post_json(b"{\"ok\":1}", &[]).await.unwrap();

        // The public roots do not trust the private CA: a retryable TLS error.
        let e = Endpoint::new(&url, None).unwrap();
        let err = e.post_json(b"{\"ok\":1}", &[]).await.unwrap_err();
        assert!(matches!(err, DeliveryError::Tls { .. }), "{err:?}");
        assert!(err.retryable());
    }
}
