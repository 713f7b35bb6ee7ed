//! Syslog, RFC 5424: `<PRI>1 TIMESTAMP HOSTNAME sov-collector PROCID MSGID
//! [sovereign@32473 rule="..." state="..." ...] MSG`, facility local0. Over UDP one datagram
//! per alert; over TCP one connection per alert, framed by RFC 6587 octet counting
//! (`LEN SP MSG`).

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

use super::config::SyslogSinkConfig;
use super::{Alert, CONNECT_TIMEOUT, DeliveryError, REQUEST_TIMEOUT, Route, Sink, summary};

/// Facility local0.
pub const FACILITY_LOCAL0: u8 = 16;
/// APP-NAME.
pub const APP_NAME: &str = "sov-collector";
/// SD-ID of the structured data element (32473 is the private enterprise number RFC 5612
/// reserves for documentation and examples).
pub const SD_ID: &str = "sovereign@32473";
/// Longest MSG part, bytes (keeps a UDP datagram well under common limits).
const MAX_MSG_BYTES: usize = 1024;

/// Transport and address of a syslog receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `udp://host:port`.
    Udp(String),
    /// `tcp://host:port`.
    Tcp(String),
}

impl Target {
    /// Parse `udp://host:port` or `tcp://host:port` (an IPv6 host in brackets).
    pub fn parse(address: &str) -> Result<Self, String> {
        let (tcp, rest) = if let Some(r) = address.strip_prefix("udp://") {
            (false, r)
        } else if let Some(r) = address.strip_prefix("tcp://") {
            (true, r)
        } else {
            return Err(format!(
                "{address:?} is not udp://host:port or tcp://host:port"
            ));
        };
        let ok = match rest.rsplit_once(':') {
            Some((h, p)) => {
                !h.is_empty()
                    && !h.contains('/')
                    && (!h.contains(':') || (h.starts_with('[') && h.ends_with(']')))
                    && p.parse::<u16>().is_ok_and(|p| p != 0)
            }
            None => false,
        };
        if !ok {
            return Err(format!("{address:?}: expected host:port after the scheme"));
        }
        Ok(if tcp {
            Self::Tcp(rest.to_owned())
        } else {
            Self::Udp(rest.to_owned())
        })
    }
}

/// One `[[alert.syslog]]`.
#[derive(Debug)]
pub struct SyslogSink {
    name: String,
    target: Target,
    hostname: String,
    route: Route,
}

impl SyslogSink {
    /// Build from its configuration.
    pub fn new(name: String, c: &SyslogSinkConfig) -> Result<Self, String> {
        Ok(Self {
            target: Target::parse(&c.address).map_err(|e| format!("{name}: {e}"))?,
            hostname: header_field(&sov_common::host::local_hostname(), 255),
            route: c.route().map_err(|e| format!("{name}: {e}"))?,
            name,
        })
    }
}

/// Syslog severity of an alert severity: critical → 2 (crit), warning → 4, info → 6.
pub fn syslog_severity(severity: &str) -> u8 {
    match severity {
        "info" => 6,
        "warning" => 4,
        _ => 2,
    }
}

/// Escape an SD-PARAM value: `"`, `\` and `]` get a backslash.
pub fn escape_param(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A header field: printable US-ASCII without spaces, at most `max` bytes, or "-".
fn header_field(v: &str, max: usize) -> String {
    let s: String = v
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if s.is_empty() { "-".to_owned() } else { s }
}

/// The RFC 5424 message (without transport framing).
pub fn format(a: &Alert, hostname: &str, procid: u32) -> String {
    let pri = FACILITY_LOCAL0 * 8 + syslog_severity(&a.severity);
    let timestamp =
        time::OffsetDateTime::parse(&a.at, &time::format_description::well_known::Rfc3339)
            .map_or_else(|_| "-".to_owned(), |_| header_field(&a.at, 64));
    let msgid = header_field(&format!("breach-{}", a.state), 32);
    let mut sd = format!("[{SD_ID}");
    for (k, v) in [
        ("rule", &a.rule),
        ("state", &a.state),
        ("severity", &a.severity),
        ("node", &a.node),
        ("subject", &a.subject),
        ("breach_id", &a.breach_id),
    ] {
        sd.push_str(&format!(" {k}=\"{}\"", escape_param(v)));
    }
    sd.push(']');
    let mut msg = summary(a).replace(['\r', '\n'], " ");
    if msg.len() > MAX_MSG_BYTES {
        let mut cut = MAX_MSG_BYTES;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
    }
    format!("<{pri}>1 {timestamp} {hostname} {APP_NAME} {procid} {msgid} {sd} {msg}")
}

#[async_trait::async_trait]
impl Sink for SyslogSink {
    fn name(&self) -> &str {
        &self.name
    }
    fn accepts(&self, a: &Alert) -> bool {
        self.route.accepts(a)
    }
    async fn deliver(&self, a: &Alert) -> Result<(), DeliveryError> {
        let line = format(a, &self.hostname, std::process::id());
        tokio::time::timeout(REQUEST_TIMEOUT, send(&self.target, line.as_bytes()))
            .await
            .map_err(|_| DeliveryError::Timeout("syslog send"))?
    }
}

async fn send(target: &Target, msg: &[u8]) -> Result<(), DeliveryError> {
    match target {
        Target::Udp(addr) => {
            let connect_err = |source| DeliveryError::Connect {
                addr: addr.clone(),
                source,
            };
            let peer = tokio::net::lookup_host(addr.as_str())
                .await
                .map_err(connect_err)?
                .next()
                .ok_or_else(|| {
                    connect_err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no address",
                    ))
                })?;
            let local: std::net::SocketAddr = if peer.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = UdpSocket::bind(local).await.map_err(DeliveryError::Io)?;
            let n = sock.send_to(msg, peer).await.map_err(DeliveryError::Io)?;
            if n != msg.len() {
                return Err(DeliveryError::Io(std::io::Error::other("short datagram")));
            }
            Ok(())
        }
        Target::Tcp(addr) => {
            let mut s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr.as_str()))
                .await
                .map_err(|_| DeliveryError::Timeout("connect"))?
                .map_err(|source| DeliveryError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            let mut framed = format!("{} ", msg.len()).into_bytes();
            framed.extend_from_slice(msg);
            s.write_all(&framed).await.map_err(DeliveryError::Io)?;
            s.flush().await.map_err(DeliveryError::Io)?;
            s.shutdown().await.map_err(DeliveryError::Io)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_param_values_escape_quotes_backslashes_and_brackets() {
        assert_eq!(escape_param(r#"a"b\c]d"#), r#"a\"b\\c\]d"#);
        assert_eq!(escape_param("plain [x]"), r"plain [x\]");
    }

    #[test]
    fn the_priority_is_local0_and_the_mapped_severity() {
        let mut a = crate::alert::tests::alert("open");
        assert!(format(&a, "h", 7).starts_with("<130>1 2025-01-02T03:04:05Z h sov-collector 7 breach-open [sovereign@32473 rule=\"foreign-egress\""));
        a.severity = "warning".into();
        assert!(format(&a, "h", 7).starts_with("<132>1 "));
        a.severity = "info".into();
        a.at = "yesterday".into();
        assert!(format(&a, "h", 7).starts_with("<134>1 - h "));
    }

    #[test]
    fn addresses_need_a_scheme_a_host_and_a_port() {
        assert_eq!(
            Target::parse("udp://127.0.0.1:514"),
            Ok(Target::Udp("127.0.0.1:514".into()))
        );
        assert_eq!(
            Target::parse("tcp://[::1]:601"),
            Ok(Target::Tcp("[::1]:601".into()))
        );
        for bad in [
            "127.0.0.1:514",
            "udp://host",
            "udp://:514",
            "tcp://h:0",
            "http://h:1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
