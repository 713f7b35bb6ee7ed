//! Startup as build, then spawn (linkerd's `Config::build → App::spawn`, vector's builder and
//! running topology): [`CollectorConfig::build`] loads and checks everything a configuration
//! names (TLS material, geolocation databases, the policy file, alert sinks, the enrollment CA,
//! the report signer), binds the HTTPS and metrics listeners and wires the services, failing
//! before anything runs; [`App::spawn`] then starts each background loop, every one living
//! with its concept and stopped by one cancellation token:
//!
//! | loop | lives in |
//! |---|---|
//! | derivation of acknowledged reports, in batches | [`crate::derive::Deriver`] |
//! | rule evaluation under the rules lease | [`crate::policy::Evaluator`] |
//! | alert delivery, one worker per sink | [`crate::alert::outbox`] |
//! | retention pruning, hourly | [`crate::store::prune_loop`] |
//! | signed checkpoints of the chained logs' heads | [`crate::checkpoint::Checkpointer`] |
//! | hourly and daily rollups, every minute | [`crate::store::rollup_loop`] |
//! | geolocation database reload | [`crate::geo::reload_loop`] |
//! | TLS material reload (gRPC, HTTPS) | [`crate::tls::reload_loop`] |
//! | HTTPS API and web page | [`crate::query::http::serve`] |
//! | Prometheus `/metrics` | [`crate::metrics::serve`] |
//!
//! [`Running::serve`] serves gRPC ([`crate::server`]) in the foreground until shutdown, then
//! stops every loop and waits for it (bounded): a batch under way commits, and once `serve`
//! returns nothing the collector started holds the store (an embedding program, a test or a
//! benchmark may close it or drop its schema; before, the deriver's last transaction could
//! still be running and `DROP SCHEMA` waited on its locks).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::alert::Sink;
use crate::config::CollectorConfig;
use crate::enroll::{EnrollService, Signer};
use crate::geo::Geo;
use crate::ingest::IngestService;
use crate::metrics::Metrics;
use crate::policy::PolicyWatch;
use crate::query::QueryService;
use crate::server::Grpc;
use crate::store::Store;
use crate::tls::{AcceptLimits, ServerTls};

/// Why the collector could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
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
    /// The deriver's threads could not be started.
    #[error("derive threads could not start")]
    Derive(#[source] crate::store::StoreError),
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

/// Everything a configuration names, loaded, checked and wired; nothing runs yet.
#[derive(Debug)]
pub struct App {
    grpc: Grpc,
    store: Arc<dyn Store>,
    geo: Geo,
    policy: Option<Arc<PolicyWatch>>,
    sinks: Vec<Arc<dyn Sink>>,
    alert_retry_max: Duration,
    https: Option<(
        TcpListener,
        Arc<ServerTls>,
        QueryService,
        crate::tls::limits::PerAddress,
    )>,
    metrics_listener: Option<TcpListener>,
    /// Woken by the deriver after a derived batch (wakes the rule evaluation).
    stored: Arc<tokio::sync::Notify>,
    /// The derive loops (each woken by ingest after a stored report): one, or on PostgreSQL
    /// `[derive] connections`.
    derivers: Vec<crate::derive::Deriver>,
    retention: crate::store::Keep,
    /// Signs the chained logs' heads (none when the collector's key cannot sign).
    checkpointer: Option<crate::checkpoint::Checkpointer>,
    /// Age after which flow minutes are rolled up (`rollup_after_hours`; at least `rollup::ROLLUP_LAG`).
    rollup_after: Duration,
}

/// The collector with its background loops started; [`Running::serve`] serves gRPC.
#[derive(Debug)]
pub struct Running {
    grpc: Grpc,
    stop: CancellationToken,
    checkpointer: Option<crate::checkpoint::Checkpointer>,
    /// Every background loop, by name: awaited (bounded) when serving ends.
    loops: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

/// How long a graceful stop waits for the background loops to end (a derivation batch or a
/// rollup under way is committed, not cut short); past it they are aborted and named.
const LOOPS_STOP_WAIT: Duration = Duration::from_secs(20);

/// `days` as a duration.
fn days(days: u32) -> Duration {
    Duration::from_secs(u64::from(days) * 86_400)
}

impl CollectorConfig {
    /// Load and check everything this configuration names and wire the services over
    /// `store`, counting into `metrics` (which the caller may read as well).
    pub async fn build(
        &self,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Result<App, AppError> {
        let config = self;
        let signer = match &config.enroll.ca_key {
            Some(key) => Some(Arc::new(Signer::load(
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
        let tls = Arc::new(ServerTls::load(
            &config.tls,
            crate::tls::ALPN_GRPC,
            &extra_chain,
        )?);
        let geo = Geo::from_config(&config.geo)?;
        tracing::info!(sources = ?geo.builds(), "geolocation ready");
        let policy = match &config.policy {
            Some(path) => Some(Arc::new(PolicyWatch::new(path)?)),
            None => None,
        };
        let stored = Arc::new(tokio::sync::Notify::new());
        let appended = Arc::new(tokio::sync::Notify::new());
        let urgent_derived = Arc::new(tokio::sync::Notify::new());
        let freshness = crate::derive::Freshness::bounded(
            Duration::from_millis(config.derive.query_wait_ms),
            Duration::from_secs(config.derive.max_lag_secs),
        );
        let deriver = crate::derive::Deriver {
            store: store.clone(),
            enricher: crate::derive::Enricher::new(geo.clone(), policy.clone()),
            metrics: metrics.clone(),
            freshness: freshness.clone(),
            appended: appended.clone(),
            derived: stored.clone(),
            batch_reports: config.derive.batch_reports,
            threads: crate::derive::derive_threads(&config.derive).map_err(AppError::Derive)?,
            slot: 0,
            urgent: Arc::default(),
            urgent_derived: urgent_derived.clone(),
        };
        let mut derivers = vec![deriver];
        for slot in 1..usize::try_from(config.derive.connections).unwrap_or(1) {
            let Some(store) = store.another_deriver() else {
                break;
            };
            // Threads of its own: sharing one set, two derivers queued their batches behind
            // each other's (PERFORMANCE.md §8v).
            let threads =
                crate::derive::derive_threads(&config.derive).map_err(AppError::Derive)?;
            let first = &derivers[0];
            derivers.push(crate::derive::Deriver {
                store,
                appended: Arc::new(tokio::sync::Notify::new()),
                slot,
                threads,
                urgent: Arc::default(),
                ..first.clone()
            });
        }
        tracing::info!(derivers = derivers.len(), "derivation ready");
        let ingest = IngestService::new(
            store.clone(),
            geo.clone(),
            config.trust_domain.clone(),
            config.max_report_bytes,
            metrics.clone(),
        )
        .notify_stored(
            derivers.iter().map(|d| d.appended.clone()).collect(),
            freshness.clone(),
        )
        .derive_first(
            derivers.iter().map(|d| d.urgent.clone()).collect(),
            policy.clone(),
        );
        let sinks = crate::alert::sinks_from_config(&config.alert).map_err(AppError::Alert)?;
        let enroll = EnrollService::new(store.clone(), signer, config.trust_domain.clone());
        let report_signer = match sov_evidence::report::ReportSigner::load(
            &config.tls.cert,
            &config.tls.key,
        ) {
            Ok(s) => Some(Arc::new(s)),
            Err(err) => {
                tracing::warn!(error = %err, "evidence reports and checkpoints cannot be signed; ExportReport will refuse");
                None
            }
        };
        let checkpointer = report_signer
            .clone()
            .map(|signer| crate::checkpoint::Checkpointer {
                store: store.clone(),
                signer,
                interval: Duration::from_secs(config.checkpoint_interval_secs),
            });
        let query = QueryService::new(store.clone(), config.trust_domain.clone(), config.max_page)
            .with_policy(policy.clone())
            .with_evidence(report_signer, Some(geo.clone()))
            .with_freshness(freshness);
        let https = match config.http.listen {
            Some(addr) => Some((
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| AppError::HttpListen { addr, source })?,
                Arc::new(ServerTls::load(&config.tls, crate::tls::ALPN_HTTPS, "")?),
                query.clone(),
                crate::tls::limits::PerAddress::new(config.limits.max_connections_per_address),
            )),
            None => None,
        };
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| AppError::MetricsListen { addr, source })?,
            ),
            None => None,
        };
        Ok(App {
            grpc: Grpc {
                ingest,
                query,
                enroll,
                tls,
                limits: AcceptLimits {
                    max_connections: config.max_connections,
                    handshake_timeout: Duration::from_secs(config.tls_handshake_timeout_secs),
                    per_address: crate::tls::limits::PerAddress::new(
                        config.limits.max_connections_per_address,
                    ),
                    anonymous_lifetime: Duration::from_secs(
                        config.limits.anonymous_connection_secs,
                    ),
                },
                report_limits: config.limits,
                max_report_bytes: config.max_report_bytes,
                metrics,
            },
            store,
            geo,
            policy,
            sinks,
            alert_retry_max: config.alert.retry_max(),
            https,
            metrics_listener,
            stored,
            derivers,
            retention: crate::store::Keep {
                raw: days(config.retention_days),
                minutes: days(
                    config
                        .minute_retention_days
                        .min(config.aggregate_retention_days),
                ),
                hours: days(
                    config
                        .hour_retention_days
                        .min(config.aggregate_retention_days),
                ),
                aggregates: days(config.aggregate_retention_days),
            },
            checkpointer,
            rollup_after: Duration::from_secs(u64::from(config.rollup_after_hours) * 3600),
        })
    }
}

impl App {
    /// Start every background loop; they stop when the returned [`Running`] is dropped.
    pub fn spawn(self) -> Running {
        let stop = CancellationToken::new();
        let store = self.store;
        let mut loops = Vec::new();
        if let Some(listener) = self.metrics_listener {
            let rules = crate::policy::rules::RULES.iter().map(|r| r.name).collect();
            let serve = crate::metrics::serve(
                listener,
                self.grpc.metrics.clone(),
                store.clone(),
                rules,
                stop.clone().cancelled_owned(),
            );
            loops.push(("metrics", tokio::spawn(serve)));
        }
        let urgent_derived = self
            .derivers
            .first()
            .map(|d| d.urgent_derived.clone())
            .unwrap_or_default();
        for d in self.derivers {
            loops.push(("deriver", tokio::spawn(d.run(stop.clone()))));
        }
        if let Some(c) = &self.checkpointer {
            loops.push(("checkpointer", tokio::spawn(c.clone().run(stop.clone()))));
        }
        let holder = crate::alert::outbox::holder_id();
        let (changed, wake) = tokio::sync::watch::channel(0u64);
        let workers = crate::alert::outbox::spawn_workers(
            &self.sinks,
            &store,
            &holder,
            self.alert_retry_max,
            &wake,
            &stop,
        );
        loops.extend(workers.into_iter().map(|w| ("alert sink worker", w)));
        if let Some((listener, tls, query, per_address)) = self.https {
            let reload = crate::tls::reload_loop(tls.clone(), "https", stop.clone());
            loops.push(("https tls reload", tokio::spawn(reload)));
            tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "https api listening");
            let serve = crate::query::http::serve(
                listener,
                tls,
                query,
                per_address,
                stop.clone().cancelled_owned(),
            );
            loops.push(("https api", tokio::spawn(serve)));
        }
        if let Some(watch) = self.policy {
            let evaluator = crate::policy::Evaluator {
                watch,
                store: store.clone(),
                geo: self.geo.clone(),
                holder,
                stored: self.stored,
                urgent: urgent_derived,
                changed,
            };
            loops.push(("rule evaluator", tokio::spawn(evaluator.run(stop.clone()))));
        }
        let rollup = crate::store::rollup_loop(store.clone(), self.rollup_after, stop.clone());
        loops.push(("rollup", tokio::spawn(rollup)));
        let prune = crate::store::prune_loop(store, self.retention, stop.clone());
        loops.push(("retention pruning", tokio::spawn(prune)));
        // Decode the country geometry of the speed-of-light check now, off the ingest path
        // (the first flow with an RTT would otherwise wait for it).
        tokio::task::spawn_blocking(|| crate::geo::shapes::Countries::shipped().len());
        let geo = crate::geo::reload_loop(self.geo, stop.clone());
        loops.push(("geolocation reload", tokio::spawn(geo)));
        let tls = crate::tls::reload_loop(self.grpc.tls.clone(), "grpc", stop.clone());
        loops.push(("grpc tls reload", tokio::spawn(tls)));
        Running {
            grpc: self.grpc,
            stop,
            checkpointer: self.checkpointer,
            loops,
        }
    }
}

impl Running {
    /// Serve gRPC on `listener` until `shutdown` completes, then drain, stop the background
    /// loops and wait for them (at most [`LOOPS_STOP_WAIT`]): when this returns, nothing the
    /// collector started holds the store.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AppError> {
        let _stop_loops: DropGuard = self.stop.clone().drop_guard();
        self.grpc
            .serve(listener, self.stop.clone(), shutdown)
            .await?;
        self.stop.cancel();
        stop_loops(self.loops, LOOPS_STOP_WAIT).await;
        // The last checkpoint, awaited: after a clean shutdown every record is signed.
        if let Some(c) = &self.checkpointer {
            match c.sign_heads().await {
                Ok(n) => tracing::info!(signed = n, "chained logs' heads signed at shutdown"),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot sign the chained logs' heads at shutdown");
                }
            }
        }
        Ok(())
    }
}

/// Waits for `loops` (already told to stop) for at most `wait` in all; those still running
/// then are aborted and named in the log.
async fn stop_loops(loops: Vec<(&'static str, tokio::task::JoinHandle<()>)>, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    for (name, mut handle) in loops {
        match tokio::time::timeout_at(deadline, &mut handle).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(task = name, error = %err, "background loop failed"),
            Err(_) => {
                tracing::warn!(
                    task = name,
                    wait_secs = wait.as_secs(),
                    "background loop still running at shutdown; aborted"
                );
                handle.abort();
            }
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
) -> Result<(), AppError> {
    run_with_metrics(config, store, listener, Arc::new(Metrics::new()), shutdown).await
}

/// [`run`], counting into `metrics` (which the caller may read as well).
pub async fn run_with_metrics(
    config: &CollectorConfig,
    store: Arc<dyn Store>,
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    config
        .build(store, metrics)
        .await?
        .spawn()
        .serve(listener, shutdown)
        .await
}
