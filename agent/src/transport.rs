//! gRPC client side: mutual TLS channel set-up, failover over several collector URLs, and
//! jittered exponential backoff between attempts.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use sov_common::tls::read_pem;
pub use sov_common::tls::{
    ClientTls, DEFAULT_CONNECT_TIMEOUT, DEFAULT_RPC_TIMEOUT, TransportError,
};
use sov_proto::pb;

/// First backoff step.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(200);

/// The agent's TLS material, reloadable while it runs: the sender takes [`TlsSource::current`]
/// for each new connection and reconnects when [`TlsSource::generation`] moves on, so a renewed
/// (or replaced) certificate is used without a restart.
#[derive(Debug)]
pub struct TlsSource {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    server_name: Option<String>,
    state: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    generation: u64,
    tls: ClientTls,
    files: Vec<Vec<u8>>,
}

impl TlsSource {
    /// Load the CA, certificate and key files.
    pub fn load(
        ca: &Path,
        cert: &Path,
        key: &Path,
        server_name: Option<String>,
    ) -> Result<Self, TransportError> {
        let mut source = Self {
            ca: ca.to_path_buf(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            server_name,
            state: Mutex::new(Loaded {
                generation: 0,
                tls: ClientTls::ca_only(""),
                files: Vec::new(),
            }),
        };
        let (tls, files) = source.read()?;
        *source
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Loaded {
            generation: 1,
            tls,
            files,
        };
        Ok(source)
    }

    /// Why the collector at `url` refuses a TLS connection with these files, in plain words
    /// ("this node's certificate expired on …", "the peer refused our certificate: signed by
    /// another CA …", "name mismatch …"), from a bare handshake; `None` when it accepts it.
    pub async fn diagnose(&self, url: &str) -> Option<String> {
        let rest = url.strip_prefix("https://").unwrap_or(url);
        let authority = rest.split('/').next().unwrap_or(rest);
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        };
        let addr = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_owned()
        } else {
            format!("{authority}:443")
        };
        let name = self.server_name.clone().unwrap_or_else(|| {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        });
        sov_common::tls_diagnose::probe(
            &addr,
            &name,
            &self.ca,
            &self.cert,
            &self.key,
            DEFAULT_CONNECT_TIMEOUT,
        )
        .await
    }

    fn read(&self) -> Result<(ClientTls, Vec<Vec<u8>>), TransportError> {
        let ca = read_pem("CA certificate", &self.ca)?;
        let cert = read_pem("certificate", &self.cert)?;
        let key = read_pem("key", &self.key)?;
        let tls = ClientTls::from_pem_bytes(&ca, &cert, &key, self.server_name.clone());
        Ok((tls, vec![ca, cert, key]))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The material to connect with now, and its generation.
    pub fn current(&self) -> (u64, ClientTls) {
        let s = self.state();
        (s.generation, s.tls.clone())
    }

    /// Bumped each time the files are reloaded with new contents.
    pub fn generation(&self) -> u64 {
        self.state().generation
    }

    /// The certificate file this source reads.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// The key file this source reads.
    pub fn key_path(&self) -> &Path {
        &self.key
    }

    /// Read the files again; when any changed, use them from now on and return `true`.
    pub fn reload_if_changed(&self) -> Result<bool, TransportError> {
        let (tls, files) = self.read()?;
        let mut s = self.state();
        if s.files == files {
            return Ok(false);
        }
        s.generation = s.generation.wrapping_add(1);
        s.tls = tls;
        s.files = files;
        Ok(true)
    }
}

/// Jittered exponential backoff: each step waits a random time between half and all of
/// `base * 2^attempt`, capped at `max` (so many agents restarting together spread out).
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never above `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// Forget past failures.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        let ceiling = self.base.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    }
}

/// The path of `Ingest/Push`.
const PUSH_PATH: &str = "/sovereign.v1.Ingest/Push";

/// `Ingest/Push` of a report already encoded: the bytes go out as they are, and the answer is
/// decoded as an [`pb::Ack`] of at most `max_ack_bytes`. The agent sends its spooled bytes
/// this way, followed by the encoding of a report holding only the sequence number and gaps
/// (protobuf: a later scalar field wins, repeated fields append), instead of decoding each
/// report, setting those and encoding it again (a tenth of the report task's CPU on a node of
/// pods). A report spooled by the agent carries neither field.
pub async fn push_encoded(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    body: bytes::Bytes,
) -> Result<pb::Ack, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(PUSH_PATH);
    grpc.unary(tonic::Request::new(body), path, Encoded)
        .await
        .map(tonic::Response::into_inner)
}

/// The encoded report with `seq` and `gaps` appended in place (what [`push_encoded`] sends):
/// it decodes as the report with both set.
pub fn with_seq_and_gaps(mut payload: Vec<u8>, seq: u64, gaps: Vec<pb::Gap>) -> bytes::Bytes {
    use prost::Message;
    let tail = pb::Report {
        seq,
        gaps,
        ..Default::default()
    };
    payload.reserve_exact(tail.encoded_len());
    tail.encode_raw(&mut payload);
    bytes::Bytes::from(payload)
}

/// A codec sending bytes as they are and decoding [`pb::Ack`].
#[derive(Debug, Clone, Copy, Default)]
struct Encoded;

impl tonic::codec::Codec for Encoded {
    type Encode = bytes::Bytes;
    type Decode = pb::Ack;
    type Encoder = Encoded;
    type Decoder = Encoded;

    fn encoder(&mut self) -> Self::Encoder {
        Encoded
    }

    fn decoder(&mut self) -> Self::Decoder {
        Encoded
    }
}

impl tonic::codec::Encoder for Encoded {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Self::Item,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Encoded {
    type Item = pb::Ack;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, Self::Error> {
        use prost::Message;
        pb::Ack::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("cannot decode the ack: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spooled_bytes_with_seq_and_gaps_after_them_decode_as_the_report_with_both() {
        use prost::Message;
        let report = pb::Report {
            epoch: 7,
            observed_unix_ms: 1_700_000_000_000,
            interval_ms: 1000,
            node_info: Some(pb::NodeInfo {
                node: "n1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let gaps = vec![
            pb::Gap {
                first_seq: 3,
                last_seq: 4,
                ..Default::default()
            },
            pb::Gap {
                first_seq: 9,
                last_seq: 9,
                ..Default::default()
            },
        ];
        let body = with_seq_and_gaps(report.encode_to_vec(), 42, gaps.clone());
        let mut want = report;
        want.seq = 42;
        want.gaps = gaps;
        assert_eq!(pb::Report::decode(body.as_ref()).expect("decodes"), want);
        assert_eq!(
            body.len(),
            want.encoded_len(),
            "no byte more than the report"
        );
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_stays_under_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let second = b.next_delay();
        assert!(second >= Duration::from_millis(100) && second <= Duration::from_millis(200));
        for _ in 0..3 {
            b.next_delay();
        }
        // 100 ms * 2^5 is past the cap: from here every delay lies in [cap/2, cap].
        for _ in 0..30 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn backoff_jitter_spreads_agents_apart() {
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(60));
                b.next_delay()
            })
            .collect();
        assert!(delays.len() > 1, "twenty agents all chose {delays:?}");
    }

    #[tokio::test]
    async fn connecting_to_a_closed_port_fails_with_the_url_in_the_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let dir = tempfile::tempdir().unwrap();
        // Any PEM text: the failure comes before TLS.
        let tls = ClientTls::from_pem("", "", "");
        let url = format!("https://127.0.0.1:{port}");
        let err = tls.connect(&url).await.unwrap_err();
        assert!(err.to_string().contains(&url), "{err}");
        drop(dir);
    }
}
