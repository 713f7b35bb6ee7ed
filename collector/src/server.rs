//! The gRPC edge: the Ingest, Query and Enroll services behind one tonic server, on already
//! handshaken mutual-TLS connections ([`crate::tls::incoming`]), with bounded streams, request
//! time and message sizes, and the revocation check on every request. It takes a bound
//! listener and a shutdown future; [`crate::app`] builds what it serves.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sov_proto::pb::enroll_server::EnrollServer;
use sov_proto::pb::ingest_server::IngestServer;
use sov_proto::pb::query_server::QueryServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::Server;

use crate::enroll::EnrollService;
use crate::ingest::IngestService;
use crate::metrics::Metrics;
use crate::query::QueryService;
use crate::tls::limits::LimitsConfig;
use crate::tls::{AcceptLimits, ServerTls};

/// Most concurrent HTTP/2 streams per connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Longest a TLS handshake may take before the connection is dropped, by default (see
/// `tls_handshake_timeout_secs`).
pub const TLS_HANDSHAKE_TIMEOUT: Duration =
    Duration::from_secs(crate::tls::DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS);
/// Longest one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest enrollment or renewal request decoded (a certificate request is well under it).
pub const ENROLL_MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What the gRPC server serves.
#[derive(Debug)]
pub struct Grpc {
    /// `sovereign.v1.Ingest`.
    pub ingest: IngestService,
    /// `sovereign.v1.Query`.
    pub query: QueryService,
    /// `sovereign.v1.Enroll`.
    pub enroll: EnrollService,
    /// The TLS front door (certificate, CA, deny list).
    pub tls: Arc<ServerTls>,
    /// Connection limit and handshake timeout.
    pub limits: AcceptLimits,
    /// Reports in flight, in all and per node.
    pub report_limits: crate::tls::limits::LimitsConfig,
    /// Largest report accepted, encoded bytes.
    pub max_report_bytes: usize,
    /// Counts connections, handshakes and refused reports.
    pub metrics: Arc<Metrics>,
}

/// tonic answers a message over the decoding limit with OUT_OF_RANGE; the contract says
/// RESOURCE_EXHAUSTED (the status gRPC documents for exceeded size limits). Our handlers never
/// return OUT_OF_RANGE, so every such status is tonic's size check. A message that does not
/// decode (a string that is not UTF-8, a truncated field) is the sender's fault, not ours:
/// tonic says INTERNAL, which a client may retry for ever; it becomes INVALID_ARGUMENT.
fn size_limit_status<B>(mut resp: http::Response<B>) -> http::Response<B> {
    const OUT_OF_RANGE: &str = "11";
    const RESOURCE_EXHAUSTED: http::HeaderValue = http::HeaderValue::from_static("8");
    const INVALID_ARGUMENT: http::HeaderValue = http::HeaderValue::from_static("3");
    let status = resp.headers().get("grpc-status").map(|v| v.as_bytes());
    if status == Some(OUT_OF_RANGE.as_bytes()) {
        resp.headers_mut().insert("grpc-status", RESOURCE_EXHAUSTED);
    } else if status == Some(b"13")
        && tonic::Status::from_header_map(resp.headers()).is_some_and(|s| {
            s.code() == tonic::Code::Internal && s.message().starts_with(DECODE_ERROR_PREFIX)
        })
    {
        resp.headers_mut().insert("grpc-status", INVALID_ARGUMENT);
    }
    resp
}

/// How tonic's protobuf codec begins the message of a request that does not decode.
const DECODE_ERROR_PREFIX: &str = "failed to decode Protobuf message";

/// The Ingest service, counting the reports tonic refuses for their size before the handler
/// runs (its OUT_OF_RANGE, rewritten to RESOURCE_EXHAUSTED by [`size_limit_status`] outside).
/// Only Ingest is wrapped, so a Query refused for its size is not counted as an ingest error.
#[derive(Debug, Clone)]
struct CountSizeRefusals<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for CountSizeRefusals<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, Req> tower::Service<Req> for CountSizeRefusals<S>
where
    S: tower::Service<Req, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            if resp
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == b"11")
            {
                metrics.ingest_error(tonic::Code::ResourceExhausted);
            }
            Ok(resp)
        })
    }
}

/// Reports in flight, per client certificate and in all: a tower service in front of the
/// Ingest service, so that one certificate's concurrent large reports cannot grow the
/// collector's memory (issue 17, finding 6).
///
/// A certificate with `max_reports_in_flight_per_node` reports in flight has the next one
/// refused at once with UNAVAILABLE, its body unread (an agent sends one report at a time and
/// retries later). It is not made to wait: the streams of one HTTP/2 connection share its
/// flow-control window, and a waiting report's buffered bytes would starve the one in flight.
/// Past the per-certificate check, a report waits for one of `max_reports_in_flight` places
/// (reports of other nodes, on other connections): backpressure, not memory growth. The memory
/// the reports in flight take is then about `max_reports_in_flight` × `max_report_bytes` × a
/// small factor (the encoded bytes, the decoded message, the stored rows).
#[derive(Debug, Clone)]
struct ReportAdmission<S> {
    inner: S,
    all: Arc<tokio::sync::Semaphore>,
    per_node: Arc<std::sync::Mutex<HashMap<Vec<u8>, Arc<tokio::sync::Semaphore>>>>,
    per_node_limit: usize,
    metrics: Arc<Metrics>,
}

impl<S> ReportAdmission<S> {
    fn new(inner: S, limits: &LimitsConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            all: Arc::new(tokio::sync::Semaphore::new(limits.max_reports_in_flight)),
            per_node: Arc::default(),
            per_node_limit: limits.max_reports_in_flight_per_node,
            metrics,
        }
    }

    /// The semaphore of the client certificate `leaf` (made on first use; forgotten when no
    /// report of it is in flight, so the map holds only certificates with reports in flight).
    fn node_semaphore(&self, leaf: &[u8]) -> Arc<tokio::sync::Semaphore> {
        let mut map = self
            .per_node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, s| Arc::strong_count(s) > 1);
        map.entry(leaf.to_vec())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.per_node_limit)))
            .clone()
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for ReportAdmission<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for ReportAdmission<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let leaf = req
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|i| i.peer_certs())
            .and_then(|c| c.first().map(|l| l.as_ref().to_vec()));
        let node = match leaf.map(|l| self.node_semaphore(&l)) {
            None => None,
            Some(s) => match s.try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    self.metrics.ingest_error(tonic::Code::Unavailable);
                    let status = tonic::Status::unavailable(format!(
                        "this node already has {} report(s) in flight (limits.max_reports_in_flight_per_node); send one at a time, retry later",
                        self.per_node_limit
                    ));
                    let resp = status.into_http();
                    return Box::pin(async move { Ok(resp) });
                }
            },
        };
        let all = self.all.clone();
        // The ready service goes with this call; a clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let _node = node;
            let _all = all.acquire_owned().await.ok();
            inner.call(req).await
        })
    }
}

impl Grpc {
    /// Serve on `listener` until `shutdown` completes, then drain; `stop` ends the accept
    /// loop's connections when the caller stops.
    pub async fn serve(
        self,
        listener: TcpListener,
        stop: CancellationToken,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let addr = listener.local_addr().ok();
        let revocation = self.tls.clone();
        let incoming =
            crate::tls::incoming(listener, self.tls, self.limits, self.metrics.clone(), stop);
        tracing::info!(listen = ?addr, "collector serving gRPC with mutual TLS");
        Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .timeout(REQUEST_TIMEOUT)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(tower::util::MapResponseLayer::new(size_limit_status))
            .layer(tower::layer::layer_fn(move |s| {
                crate::tls::RevocationCheck::new(s, revocation.clone())
            }))
            .add_service(ReportAdmission::new(
                CountSizeRefusals {
                    inner: IngestServer::new(self.ingest)
                        .max_decoding_message_size(self.max_report_bytes),
                    metrics: self.metrics.clone(),
                },
                &self.report_limits,
                self.metrics.clone(),
            ))
            .add_service(QueryServer::new(self.query))
            .add_service(
                EnrollServer::new(self.enroll).max_decoding_message_size(ENROLL_MAX_REQUEST_BYTES),
            )
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        tracing::info!("collector stopped");
        Ok(())
    }
}
