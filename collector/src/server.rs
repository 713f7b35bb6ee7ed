//! The gRPC server: mutual TLS, the Ingest and Query services, bounded message sizes.
//! It takes a bound gRPC listener and a shutdown future; the one address it binds itself is the
//! optional Prometheus endpoint (`[metrics] listen`, see [`crate::metrics`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sov_proto::pb::ingest_server::IngestServer;
use sov_proto::pb::query_server::QueryServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::CollectorConfig;
use crate::ingest::IngestService;
use crate::metrics::Metrics;
use crate::query::QueryService;
use crate::store::Store;

/// Most concurrent HTTP/2 streams per connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Longest a TLS handshake may take before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often old time series rows are pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A PEM file could not be read.
    #[error("cannot read {path}")]
    ReadPem {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A geolocation database or override could not be loaded.
    #[error("geolocation set-up failed")]
    Geo(#[from] crate::geo::GeoError),
    /// TLS or the HTTP/2 server failed.
    #[error("grpc server failed")]
    Transport(#[from] tonic::transport::Error),
    /// The policy file (`policy`) could not be loaded.
    #[error("policy set-up failed")]
    Policy(#[from] crate::policy::PolicyError),
    /// The HTTPS API address (`[http] listen`) could not be bound.
    #[error("cannot listen for https on {addr}")]
    HttpListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTPS API's TLS configuration could not be built.
    #[error("https api set-up failed")]
    Http(#[from] crate::query::http::HttpError),
    /// The metrics address (`[metrics] listen`) could not be bound.
    #[error("cannot listen for metrics on {addr}")]
    MetricsListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::ReadPem {
        path: path.display().to_string(),
        source,
    })
}

/// tonic answers a message over the decoding limit with OUT_OF_RANGE; the contract says
/// RESOURCE_EXHAUSTED (the status gRPC documents for exceeded size limits). Our handlers never
/// return OUT_OF_RANGE, so every such status is tonic's size check.
fn size_limit_status<B>(mut resp: http::Response<B>) -> http::Response<B> {
    const OUT_OF_RANGE: &str = "11";
    const RESOURCE_EXHAUSTED: http::HeaderValue = http::HeaderValue::from_static("8");
    if resp
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == OUT_OF_RANGE.as_bytes())
    {
        resp.headers_mut().insert("grpc-status", RESOURCE_EXHAUSTED);
    }
    resp
}

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

/// Prune time series older than `retention` now and then every [`PRUNE_EVERY`].
async fn prune_loop(store: Arc<dyn Store>, retention: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let cutoff = crate::ingest::now_unix_ms()
            .saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        match store.prune(cutoff).await {
            Ok(s) => tracing::info!(
                host_samples = s.host_samples,
                gpu_samples = s.gpu_samples,
                gpu_usage = s.gpu_usage,
                report_bodies = s.report_bodies,
                "retention pruned old rows"
            ),
            Err(err) => tracing::warn!(error = %err, "retention prune failed; will retry"),
        }
    }
}

/// How often geolocation database files are checked for changes.
pub const GEO_RELOAD_EVERY: Duration = Duration::from_secs(30);

/// Reload changed geolocation databases now and then (lookups continue meanwhile).
async fn geo_reload_loop(geo: crate::geo::Geo, stop: CancellationToken) {
    let mut tick = tokio::time::interval(GEO_RELOAD_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let g = geo.clone();
        if let Ok(true) = tokio::task::spawn_blocking(move || g.reload_if_changed()).await {
            tracing::info!(sources = ?geo.builds(), "geolocation databases reloaded");
        }
    }
}

/// How often the policy file is checked for changes.
pub const POLICY_RELOAD_EVERY: Duration = Duration::from_secs(10);

/// Evaluate the breach rules ([`crate::policy::rules`]) every
/// [`crate::policy::rules::EVAL_EVERY`] against the policy current at that moment, reloading
/// the policy file when it changes (checked every [`POLICY_RELOAD_EVERY`]).
async fn policy_loop(
    watch: Arc<crate::policy::PolicyWatch>,
    store: Arc<dyn Store>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(crate::policy::rules::EVAL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_reload = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if last_reload.elapsed() >= POLICY_RELOAD_EVERY {
            last_reload = tokio::time::Instant::now();
            let w = watch.clone();
            if let Ok(true) = tokio::task::spawn_blocking(move || w.reload_if_changed()).await {
                tracing::info!(path = %watch.path().display(), "policy reloaded");
            }
        }
        let policy = watch.current();
        let now = crate::ingest::now_unix_ms();
        if let Err(err) = crate::policy::rules::evaluate(&policy, store.as_ref(), now).await {
            tracing::warn!(error = %err, "breach rule evaluation failed; will retry");
        }
    }
}

/// Serve gRPC on `listener` until `shutdown` completes, then drain; with `[metrics] listen`,
/// also serve `/metrics` there until then.
pub async fn run(
    config: &CollectorConfig,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    run_with_metrics(config, store, listener, Arc::new(Metrics::new()), shutdown).await
}

/// [`run`], counting into `metrics` (which the caller may read as well).
pub async fn run_with_metrics(
    config: &CollectorConfig,
    store: Arc<dyn Store>,
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(&config.tls.cert)?,
            read(&config.tls.key)?,
        ))
        .client_ca_root(Certificate::from_pem(read(&config.tls.ca)?))
        // A missing certificate is answered with UNAUTHENTICATED by the services (a clearer
        // error than a failed handshake); a certificate that does not chain to the CA still
        // fails the handshake.
        .client_auth_optional(true)
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    let geo = crate::geo::Geo::from_config(&config.geo)?;
    tracing::info!(sources = ?geo.builds(), "geolocation ready");
    let ingest = IngestService::new(
        store.clone(),
        geo.clone(),
        config.trust_domain.clone(),
        config.max_report_bytes,
        metrics.clone(),
    );
    let policy_watch = match &config.policy {
        Some(path) => Some(Arc::new(crate::policy::PolicyWatch::new(path)?)),
        None => None,
    };
    let signer = match crate::report::ReportSigner::load(&config.tls.cert, &config.tls.key) {
        Ok(s) => Some(Arc::new(s)),
        Err(err) => {
            tracing::warn!(error = %err, "evidence reports cannot be signed; ExportReport will refuse");
            None
        }
    };
    let query = QueryService::new(store.clone(), config.trust_domain.clone(), config.max_page)
        .with_policy(policy_watch.clone())
        .with_evidence(signer, Some(geo.clone()));
    let http_listener = match config.http.listen {
        Some(addr) => Some((
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::HttpListen { addr, source })?,
            crate::query::http::tls_config(&config.tls)?,
        )),
        None => None,
    };
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    let maintenance = CancellationToken::new();
    if let Some(l) = metrics_listener {
        tokio::spawn(crate::metrics::serve(
            l,
            metrics.clone(),
            store.clone(),
            maintenance.clone().cancelled_owned(),
        ));
    }
    if let Some((l, tls)) = http_listener {
        tracing::info!(addr = %config.http.listen.map(|a| a.to_string()).unwrap_or_default(), "https api listening");
        tokio::spawn(crate::query::http::serve(
            l,
            tls,
            query.clone(),
            maintenance.clone().cancelled_owned(),
        ));
    }
    if let Some(watch) = policy_watch {
        tokio::spawn(policy_loop(watch, store.clone(), maintenance.clone()));
    }
    tokio::spawn(prune_loop(
        store,
        Duration::from_secs(u64::from(config.retention_days) * 86_400),
        maintenance.clone(),
    ));
    tokio::spawn(geo_reload_loop(geo, maintenance.clone()));
    let _stop_maintenance = maintenance.drop_guard();
    let addr = listener.local_addr().ok();
    // tonic sets TCP_NODELAY only on listeners it binds itself; without it an ack can wait
    // for the peer's delayed ACK (about 40 ms, measured in bench_ingest's p99).
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        })
    });
    tracing::info!(listen = ?addr, "collector serving gRPC with mutual TLS");
    Server::builder()
        .tls_config(tls)?
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .timeout(REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(tower::util::MapResponseLayer::new(size_limit_status))
        .add_service(CountSizeRefusals {
            inner: IngestServer::new(ingest).max_decoding_message_size(config.max_report_bytes),
            metrics,
        })
        .add_service(QueryServer::new(query))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    tracing::info!("collector stopped");
    Ok(())
}
