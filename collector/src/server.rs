//! The gRPC server: mutual TLS, the Ingest and Query services, bounded message sizes.
//! It takes a bound gRPC listener and a shutdown future; the one address it binds itself is the
//! optional Prometheus endpoint (`[metrics] listen`, see [`crate::metrics`]).

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

use crate::config::CollectorConfig;
use crate::ingest::IngestService;
use crate::metrics::Metrics;
use crate::query::QueryService;
use crate::store::Store;

/// Most concurrent HTTP/2 streams per connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Longest a TLS handshake may take before the connection is dropped, by default (see
/// `tls_handshake_timeout_secs`).
pub const TLS_HANDSHAKE_TIMEOUT: Duration =
    Duration::from_secs(crate::config::DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS);
/// Longest one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest enrollment or renewal request decoded (a certificate request is well under it).
pub const ENROLL_MAX_REQUEST_BYTES: usize = 64 * 1024;
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
    /// The TLS configuration (`[tls]`) could not be built.
    #[error("tls set-up failed")]
    Tls(#[from] crate::tls::TlsError),
    /// TLS or the HTTP/2 server failed.
    #[error("grpc server failed")]
    Transport(#[from] tonic::transport::Error),
    /// The policy file (`policy`) could not be loaded.
    #[error("policy set-up failed")]
    Policy(#[from] crate::policy::PolicyError),
    /// An alert sink (`[alert]`) could not be set up.
    #[error("alert set-up failed: {0}")]
    Alert(String),
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
    /// The enrollment CA (`[enroll] ca_key`) could not be loaded.
    #[error("enrollment set-up failed")]
    Enroll(#[from] crate::enroll::EnrollError),
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

/// Prune now and then every [`PRUNE_EVERY`]: raw rows older than `raw`, minute aggregates
/// older than `aggregates` (see [`crate::store::Retention`]).
async fn prune_loop(
    store: Arc<dyn Store>,
    raw: Duration,
    aggregates: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    let ago = |d: Duration| {
        sov_common::clock::now_unix_ms()
            .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let retention = crate::store::Retention {
            raw_before_unix_ms: ago(raw),
            aggregates_before_unix_ms: ago(aggregates),
        };
        match store.prune(retention).await {
            Ok(s) if s.skipped => {
                tracing::debug!("retention skipped: another replica is pruning");
            }
            Ok(s) => tracing::info!(
                host_samples = s.host_samples,
                gpu_samples = s.gpu_samples,
                gpu_usage = s.gpu_usage,
                report_bodies = s.report_bodies,
                flows = s.flows,
                downsampled = s.downsampled,
                aggregates = s.aggregates,
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

/// Lease under which one replica evaluates the rules.
const RULES_LEASE: &str = "rules";
/// How long the rules lease lasts without renewal.
const RULES_LEASE_TTL: Duration = Duration::from_secs(10);
/// Shortest time between two evaluations (reports arriving back to back wake the loop only
/// this often).
const MIN_EVAL_GAP: Duration = Duration::from_millis(250);
/// An evaluation that took `t` is followed by at least `t × EVAL_GAP_FACTOR` without one: on a
/// large installation the rules use at most a fifth of the time, whatever the report rate.
const EVAL_GAP_FACTOR: u32 = 4;

/// What the rule evaluation loop needs.
struct PolicyLoop {
    watch: Arc<crate::policy::PolicyWatch>,
    store: Arc<dyn Store>,
    geo: crate::geo::Geo,
    holder: String,
    /// Woken by ingest after a stored report.
    stored: Arc<tokio::sync::Notify>,
    /// Bumped after an evaluation that changed the breach log (wakes the alert workers).
    changed: tokio::sync::watch::Sender<u64>,
}

/// Evaluate the breach rules ([`crate::policy::rules`]) every
/// [`crate::policy::rules::EVAL_EVERY`], and soon after a report is stored, against the policy
/// current at that moment, reloading the policy file when it changes (checked every
/// [`POLICY_RELOAD_EVERY`]). Among replicas, only the holder of the rules lease evaluates.
async fn policy_loop(p: PolicyLoop, stop: CancellationToken) {
    let mut last_reload = tokio::time::Instant::now();
    let ttl = i64::try_from(RULES_LEASE_TTL.as_millis()).unwrap_or(i64::MAX);
    loop {
        let started = tokio::time::Instant::now();
        if last_reload.elapsed() >= POLICY_RELOAD_EVERY {
            last_reload = tokio::time::Instant::now();
            let w = p.watch.clone();
            if let Ok(true) = tokio::task::spawn_blocking(move || w.reload_if_changed()).await {
                tracing::info!(path = %p.watch.path().display(), "policy reloaded");
            }
        }
        let now = sov_common::clock::now_unix_ms();
        match p.store.take_lease(RULES_LEASE, &p.holder, now, ttl).await {
            Ok(true) => {
                let policy = p.watch.current();
                match crate::policy::rules::evaluate(&policy, p.store.as_ref(), &p.geo, now).await {
                    Ok(e) if e.changed() => {
                        p.changed.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::warn!(error = %err, "breach rule evaluation failed; will retry");
                    }
                }
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(error = %err, "cannot take the rules lease; will retry"),
        }
        let gap = MIN_EVAL_GAP.max(started.elapsed().saturating_mul(EVAL_GAP_FACTOR));
        tokio::select! {
            () = tokio::time::sleep_until(started + gap) => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep_until(started + crate::policy::rules::EVAL_EVERY) => {}
            () = p.stored.notified() => {}
            () = stop.cancelled() => return,
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
    let signer = match &config.enroll.ca_key {
        Some(key) => Some(Arc::new(crate::enroll::Signer::load(
            &config.tls.ca,
            key,
            Duration::from_secs(config.enroll.validity_secs),
            &config.trust_domain,
        )?)),
        None => None,
    };
    let mut extra_chain = String::new();
    if let Some(s) = &signer {
        // Agents enrolling pin the CA by its hash: they find it in the chain we send.
        extra_chain.push_str(s.ca_pem());
        tracing::info!(
            ca_sha256 = %crate::enroll::ca_file_fingerprint(&config.tls.ca).unwrap_or_default(),
            validity_secs = config.enroll.validity_secs,
            "enrollment on"
        );
    }
    let tls = Arc::new(crate::tls::ServerTls::load(
        &config.tls,
        crate::tls::ALPN_GRPC,
        &extra_chain,
    )?);
    let geo = crate::geo::Geo::from_config(&config.geo)?;
    tracing::info!(sources = ?geo.builds(), "geolocation ready");
    let stored = Arc::new(tokio::sync::Notify::new());
    let ingest = IngestService::new(
        store.clone(),
        geo.clone(),
        config.trust_domain.clone(),
        config.max_report_bytes,
        metrics.clone(),
    )
    .notify_stored(stored.clone());
    let sinks = crate::alert::sinks_from_config(&config.alert).map_err(ServerError::Alert)?;
    let enroll =
        crate::enroll::EnrollService::new(store.clone(), signer, config.trust_domain.clone());
    let policy_watch = match &config.policy {
        Some(path) => Some(Arc::new(crate::policy::PolicyWatch::new(path)?)),
        None => None,
    };
    let signer = match sov_evidence::report::ReportSigner::load(&config.tls.cert, &config.tls.key) {
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
            Arc::new(crate::tls::ServerTls::load(
                &config.tls,
                crate::tls::ALPN_HTTPS,
                "",
            )?),
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
    let holder = crate::alert::outbox::holder_id();
    let (changed, wake) = tokio::sync::watch::channel(0u64);
    crate::alert::outbox::spawn_workers(
        &sinks,
        &store,
        &holder,
        config.alert.retry_max(),
        &wake,
        &maintenance,
    );
    if let Some((l, tls)) = http_listener {
        tokio::spawn(crate::tls::reload_loop(
            tls.clone(),
            "https",
            maintenance.clone(),
        ));
        tracing::info!(addr = %config.http.listen.map(|a| a.to_string()).unwrap_or_default(), "https api listening");
        tokio::spawn(crate::query::http::serve(
            l,
            tls,
            query.clone(),
            maintenance.clone().cancelled_owned(),
        ));
    }
    if let Some(watch) = policy_watch {
        let p = PolicyLoop {
            watch,
            store: store.clone(),
            geo: geo.clone(),
            holder,
            stored,
            changed,
        };
        tokio::spawn(policy_loop(p, maintenance.clone()));
    }
    tokio::spawn(prune_loop(
        store,
        Duration::from_secs(u64::from(config.retention_days) * 86_400),
        Duration::from_secs(u64::from(config.aggregate_retention_days) * 86_400),
        maintenance.clone(),
    ));
    tokio::spawn(geo_reload_loop(geo, maintenance.clone()));
    let addr = listener.local_addr().ok();
    tokio::spawn(crate::tls::reload_loop(
        tls.clone(),
        "grpc",
        maintenance.clone(),
    ));
    let revocation = tls.clone();
    let incoming = crate::tls::incoming(
        listener,
        tls,
        crate::tls::AcceptLimits {
            max_connections: config.max_connections,
            handshake_timeout: Duration::from_secs(config.tls_handshake_timeout_secs),
        },
        metrics.clone(),
        maintenance.clone(),
    );
    let _stop_maintenance = maintenance.drop_guard();
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
        .add_service(CountSizeRefusals {
            inner: IngestServer::new(ingest).max_decoding_message_size(config.max_report_bytes),
            metrics,
        })
        .add_service(QueryServer::new(query))
        .add_service(EnrollServer::new(enroll).max_decoding_message_size(ENROLL_MAX_REQUEST_BYTES))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    tracing::info!("collector stopped");
    Ok(())
}
