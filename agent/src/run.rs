//! The agent's two long tasks: the report builder (every `interval_secs`: observe, build a
//! report, append it durably to the spool) and the sender (deliver the spool's oldest report,
//! delete it only after the collector's ack, reconnect with backoff, fail over between URLs).
//!
//! A report is never poison: the builder clamps it to the wire contract ([`crate::bounds`]) and
//! packs the weight inventory into as many reports as its size needs ([`crate::shape::pack`]);
//! the sender answers a refusal (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, OUT_OF_RANGE) by sending
//! the same seq again with items withheld and declared ([`crate::shape::withhold`]), and gives
//! the seq up as a REFUSED gap, with the collector's words, only when nothing is left to
//! withhold. A spool error in the sender (a full disk, say) is logged and retried, never the
//! end of delivery.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use sov_common::clock::now_unix_ms;
use sov_proto::pb;
use sov_proto::pb::ingest_client::IngestClient;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::collect::gpu::GpuCollector;
use crate::collect::net::NetHandle;
use crate::collect::training::{Tracker, TrainingHandle};
use crate::collect::weights::inventory::{WeightsHandle, WeightsScanner, link_gpus};
use crate::collect::weights::schedule::Hint;
use crate::config::AgentConfig;
use crate::metrics::{AgentMetrics, AgentScrape};
use crate::observe::Observer;
use crate::spool::{GapKind, GapRange, Spool, SpoolError};
use crate::transport::{Backoff, DEFAULT_BACKOFF_BASE, TlsSource, TransportError};

/// Version of this agent, sent in every report.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// How often the client certificate files are checked for changes (and its expiry for
/// renewal) at the least.
pub const TLS_RECHECK: Duration = Duration::from_secs(600);
/// Longest wait between two failed renewal attempts.
const RENEW_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Largest ack the agent decodes (restricted-model hints included).
const MAX_ACK_BYTES: usize = 1024 * 1024;
/// Most times one seq is trimmed and sent again before it is given up as a REFUSED gap.
pub const MAX_WITHHOLD_STEPS: usize = 64;
/// Wait before retrying after the spool failed (a full or failing disk).
const SPOOL_RETRY: Duration = Duration::from_secs(1);

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The spool could not be opened or written.
    #[error("spool error")]
    Spool(#[from] SpoolError),
    /// TLS material could not be loaded.
    #[error("tls set-up failed")]
    Transport(#[from] TransportError),
    /// The metrics address (`[metrics] listen`) could not be bound.
    #[error("cannot listen for metrics on {addr}")]
    MetricsListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A blocking task panicked.
    #[error("internal task failed: {0}")]
    Join(String),
}

/// A running agent's shared state: the spool and the wake-up for the sender.
#[derive(Debug, Clone)]
pub struct Agent {
    spool: Arc<Mutex<Spool>>,
    observer: Arc<Mutex<Observer>>,
    wake: Arc<Notify>,
    config: Arc<AgentConfig>,
    node: String,
    metrics: Arc<AgentMetrics>,
    /// The weight inventory (fed by the scanner thread when weights are enabled).
    weights: WeightsHandle,
    /// Training runs (fed by the sampler thread when training and weights are enabled).
    training: TrainingHandle,
    /// The collector's `max_report_bytes` from its last ack; 0 until one came.
    collector_limit: Arc<AtomicU64>,
}

/// Lock the spool; a poisoned lock (a panic while holding it) is still usable because every
/// spool operation leaves the files consistent before it returns.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Agent {
    /// Open the spool and prepare; nothing runs until [`Agent::run`].
    pub fn open(config: AgentConfig) -> Result<Self, AgentError> {
        let spool = Spool::open(&config.spool_dir, config.max_spool_bytes)?;
        let node = config.node_name();
        let observer = Observer::from_config(&config);
        let config_training_floor = config.training.dataset_min_bytes;
        let config_training_hash_max = config.training.dataset_hash_max_bytes;
        let config_training_recheck = config.training.recheck_secs;
        let config_training_idle_mark = config.training.idle_mark_secs;
        Ok(Self {
            spool: Arc::new(Mutex::new(spool)),
            observer: Arc::new(Mutex::new(observer)),
            wake: Arc::new(Notify::new()),
            config: Arc::new(config),
            node,
            metrics: Arc::default(),
            weights: WeightsHandle::default(),
            training: TrainingHandle::new(
                Tracker::new(Path::new("/proc"), config_training_floor)
                    .with_dataset_hashes(config_training_hash_max)
                    .with_recheck_secs(config_training_recheck)
                    .with_idle_mark_secs(config_training_idle_mark),
            ),
            collector_limit: Arc::default(),
        })
    }

    /// Observe GPUs through `gpu` instead of NVML (`None` disables GPU observation). Tests
    /// use a scripted probe here.
    pub fn with_gpu(self, gpu: Option<GpuCollector>) -> Self {
        let mut observer = lock(&self.observer);
        let containers = observer.containers();
        *observer = Observer::with_settings(&self.config.processes, &self.config.budget, gpu);
        observer.set_containers(containers);
        drop(observer);
        self
    }

    /// The node name reports carry.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Spool counters (waiting reports, drops, next sequence number).
    pub fn spool_stats(&self) -> crate::spool::SpoolStats {
        lock(&self.spool).stats()
    }

    /// Run until `shutdown` is cancelled: build reports and deliver them.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let tls = Arc::new(TlsSource::load(
            &self.config.tls.ca,
            &self.config.tls.cert,
            &self.config.tls.key,
            self.config.tls.server_name.clone(),
        )?);
        {
            let s = self.spool_stats();
            tracing::info!(
                node = %self.node,
                epoch = s.epoch,
                next_seq = s.next_seq,
                waiting = s.reports,
                collectors = ?self.config.collector,
                "agent started"
            );
        }
        if let Some(addr) = self.config.metrics.listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::MetricsListen { addr, source })?;
            let agent = self.clone();
            let render = move || {
                let agent = agent.clone();
                async move { agent.render_metrics() }
            };
            tokio::spawn(crate::prometheus::serve(
                listener,
                "agent",
                render,
                shutdown.clone().cancelled_owned(),
            ));
        }
        let containers = lock(&self.observer).containers();
        if let Err(e) = containers.spawn_refresher() {
            tracing::error!(error = %e, "cannot start the container runtime client; containers are named from their cgroup only");
        }
        let weights = self.start_weights();
        let training = weights.as_ref().and_then(|_| self.start_training());
        let net = self.start_net();
        let renewer = tokio::spawn(self.clone().renew_loop(tls.clone(), shutdown.clone()));
        let sender = tokio::spawn(self.clone().send_loop(tls, shutdown.clone()));
        let built = self
            .build_loop(
                shutdown.clone(),
                weights.as_ref().map(|w| w.0.clone()),
                net.as_ref().map(|n| n.0.clone()),
            )
            .await;
        shutdown.cancel();
        let sent = sender.await.map_err(|e| AgentError::Join(e.to_string()));
        let _ = renewer.await;
        if let Some((_, stop, thread)) = net {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if let Some((_, stop, thread)) = weights {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if let Some((stop, thread)) = training {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        built?;
        sent??;
        Ok(())
    }

    /// The agent's own metrics, as `GET /metrics` answers them.
    pub fn render_metrics(&self) -> String {
        let cert_not_after_unix = std::fs::read(&self.config.tls.cert)
            .ok()
            .and_then(|pem| crate::enroll::validity(&pem).ok())
            .and_then(|(_, na)| na.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        self.metrics.render(&AgentScrape {
            spool: self.spool_stats(),
            cert_not_after_unix,
            process: crate::prometheus::ProcessStats::read(),
        })
    }

    /// Start the weight scanner thread when enabled.
    fn start_weights(
        &self,
    ) -> Option<(
        WeightsHandle,
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )> {
        let cfg = &self.config.weights;
        if !cfg.enabled {
            return None;
        }
        let state_dir = cfg.state_dir.clone().unwrap_or_else(|| {
            self.config
                .spool_dir
                .parent()
                .map_or_else(|| self.config.spool_dir.clone(), Path::to_path_buf)
        });
        let handle = self.weights.clone();
        // One lock at a time: a guard taken inside the chain would live to the end of the
        // statement, and a second `lock` in it would deadlock.
        let (containers, table) = {
            let observer = lock(&self.observer);
            (observer.containers(), observer.proc_table())
        };
        let scanner = WeightsScanner::new(cfg.clone(), &state_dir, handle.clone())
            .with_containers(containers)
            .with_table(table)
            .with_cpu_budget(self.config.budget.max_cpu_percent);
        lock(&self.observer).set_weights(handle.clone());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        match std::thread::Builder::new()
            .name("sov-weights".into())
            .spawn(move || scanner.run(s))
        {
            Ok(thread) => Some((handle, stop, thread)),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the weight scanner; weights will not be reported");
                None
            }
        }
    }

    /// Start the training sampler thread when enabled.
    fn start_training(
        &self,
    ) -> Option<(
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )> {
        let cfg = &self.config.training;
        if !cfg.enabled {
            return None;
        }
        let handle = self.training.clone();
        let interval = Duration::from_millis(cfg.sample_interval_ms);
        let rate = self.config.weights.hash_rate_mb_per_sec;
        let rate = (rate > 0).then(|| rate.saturating_mul(1_000_000));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        match std::thread::Builder::new()
            .name("sov-training".into())
            .spawn(move || handle.sample_until(interval, rate, &s))
        {
            Ok(thread) => Some((stop, thread)),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the training sampler; training runs will not be reported");
                None
            }
        }
    }

    /// Start the flow sampler thread when enabled.
    fn start_net(
        &self,
    ) -> Option<(
        NetHandle,
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )> {
        if !self.config.net.enabled {
            return None;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (containers, table) = {
            let observer = lock(&self.observer);
            (observer.containers(), observer.proc_table())
        };
        let collector = crate::collect::net::NetCollector::new(&self.config.net)
            .with_containers(containers)
            .with_table(table);
        match NetHandle::spawn_with(collector, self.config.net.clone(), stop.clone()) {
            Ok((handle, thread)) => Some((handle, stop, thread)),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the flow sampler; flows will not be reported");
                None
            }
        }
    }

    async fn build_loop(
        &self,
        shutdown: CancellationToken,
        weights: Option<WeightsHandle>,
        net: Option<NetHandle>,
    ) -> Result<(), AgentError> {
        let mut node_info = pb::NodeInfo {
            node: self.node.clone(),
            hostname: crate::config::local_hostname(),
            site: self.config.node.site.clone(),
            country: self.config.node.country.clone(),
            labels: self.config.node.labels.clone().into_iter().collect(),
            agent_version: AGENT_VERSION.to_owned(),
            ..Default::default()
        };
        lock(&self.observer).node_facts(&mut node_info);
        let interval = Duration::from_secs(self.config.interval_secs);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick completes at once; skip it so the first sample covers a real interval.
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => return Ok(()),
            }
            // Flows first, so that their owners are described in this report's processes.
            let (flows, net_status) = match &net {
                Some(n) => n.take_fresh().await,
                None => Default::default(),
            };
            let owners: Vec<(u32, pb::ProcessReason)> = {
                let mut pids: Vec<u32> = flows.iter().map(|f| f.pid).filter(|p| *p != 0).collect();
                pids.sort_unstable();
                pids.dedup();
                pids.into_iter()
                    .map(|p| (p, pb::ProcessReason::Flow))
                    .collect()
            };
            self.metrics.short_connections(
                net_status.short_connections,
                net_status.short_unknown_owners,
            );
            if net_status.mode == "proc-fallback" {
                tracing::debug!(reason = %net_status.reason, "flows without byte counts");
            }
            let started = std::time::Instant::now();
            let observer = self.observer.clone();
            let obs = tokio::task::spawn_blocking(move || {
                lock(&observer).observe_with(std::time::Instant::now(), &owners)
            })
            .await
            .map_err(|e| AgentError::Join(e.to_string()))?;
            let stats = self.spool_stats();
            let full_every = Duration::from_secs(self.config.weights.full_inventory_secs);
            let mut update = weights
                .as_ref()
                .map(|w| w.take_update(std::time::Instant::now(), full_every))
                .unwrap_or_default();
            link_gpus(&mut update.files, &obs.gpu.devices);
            let training_runs = match &weights {
                Some(w) if self.config.training.enabled => {
                    self.training_runs(w, &obs.gpu.devices).await?
                }
                _ => vec![],
            };
            let base = pb::Report {
                epoch: stats.epoch,
                seq: 0,
                observed_unix_ms: now_unix_ms(),
                node_info: Some(node_info.clone()),
                interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
                agent: Some(pb::AgentStats {
                    spool_bytes: stats.bytes,
                    spool_reports: stats.reports,
                    dropped_reports: stats.dropped_total,
                    ..obs.agent_stats()
                }),
                host: Some(obs.host),
                gpu_state: Some(obs.gpu.state),
                gpus: obs.gpu.devices,
                processes: obs.processes.processes,
                flows,
                training_runs,
                ..Default::default()
            };
            let inventory = crate::shape::Inventory {
                generation: update.generation.filter(|_| update.full),
                files: update.files,
                removed: update.removed,
            };
            let budget = crate::shape::report_budget(self.collector_limit.load(Ordering::Relaxed));
            let mut reports = crate::shape::pack(base, inventory, budget);
            for r in &mut reports {
                let clamped = crate::bounds::clamp_report(r);
                if clamped > 0 {
                    tracing::warn!(clamped, "report values clamped to the wire contract");
                }
            }
            if reports.len() > 1 {
                tracing::info!(
                    reports = reports.len(),
                    "weight inventory split across reports"
                );
            }
            let spool = self.spool.clone();
            let unsent = tokio::task::spawn_blocking(move || {
                // The record header carries the sequence number; the sender copies it into
                // the report when it sends it.
                let mut s = lock(&spool);
                for (i, r) in reports.iter().enumerate() {
                    match s.append(&r.encode_to_vec()) {
                        Ok(o) => tracing::debug!(seq = o.seq, stored = o.stored, "report spooled"),
                        Err(err) => return Some((err, reports.split_off(i))),
                    }
                }
                None
            })
            .await
            .map_err(|e| AgentError::Join(e.to_string()))?;
            self.metrics
                .cycle(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
            // A full or failing disk must not stop observation: log and try next interval, and
            // keep the weight files that were not spooled for the next report.
            if let Some((err, left)) = unsent {
                tracing::error!(error = %err, "cannot spool report");
                let paths: Vec<String> = left
                    .iter()
                    .flat_map(|r| r.weight_files.iter().map(|f| f.path.clone()))
                    .collect();
                self.weights.requeue(&paths);
            }
            self.wake.notify_one();
        }
    }

    /// Point the training sampler at the processes that use weights or GPUs now, and the
    /// runs to report: the inventory is joined only when some process writes weights.
    async fn training_runs(
        &self,
        weights: &WeightsHandle,
        gpus: &[pb::GpuSample],
    ) -> Result<Vec<pb::TrainingRun>, AgentError> {
        let mut candidates = weights.user_pids();
        candidates.extend(gpus.iter().flat_map(|d| d.processes.iter().map(|p| p.pid)));
        self.training.set_candidates(candidates);
        if !self.training.has_writers() {
            return Ok(vec![]);
        }
        let training = self.training.clone();
        let weights = weights.clone();
        let gpus = gpus.to_vec();
        let containers = lock(&self.observer).containers();
        tokio::task::spawn_blocking(move || {
            weights.set_extra_roots(training.output_dirs());
            let files = weights.files();
            training.runs(&files, &gpus, &|pid| containers.of_pid(pid), now_unix_ms())
        })
        .await
        .map_err(|e| AgentError::Join(e.to_string()))
    }

    /// Keep the client certificate fresh: renew it at two thirds of its lifetime
    /// ([`crate::enroll::renew_due_at`]) and reload the TLS material whenever its files change
    /// (after a renewal, or when an operator replaced them), checked at least every
    /// [`TLS_RECHECK`].
    async fn renew_loop(self, tls: Arc<TlsSource>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_secs(1), RENEW_MAX_BACKOFF);
        loop {
            match tls.reload_if_changed() {
                Ok(true) => {
                    tracing::info!(cert = %tls.cert_path().display(), "client certificate reloaded")
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(error = %err, cause = %source_chain(&err), "cannot reload the client certificate; keeping the current one")
                }
            }
            let now = SystemTime::now();
            let due = std::fs::read(tls.cert_path())
                .map_err(|e| e.to_string())
                .and_then(|pem| crate::enroll::validity(&pem))
                .map(|(nb, na)| (crate::enroll::renew_due_at(nb, na), na));
            let wait = match (&due, self.config.tls.renew) {
                (Ok((due, _)), true) if *due <= now => None,
                (Ok((due, _)), true) => {
                    Some(due.duration_since(now).unwrap_or_default().min(TLS_RECHECK))
                }
                (Err(err), _) => {
                    tracing::warn!(error = %err, "cannot read the client certificate's validity");
                    Some(TLS_RECHECK)
                }
                (_, false) => Some(TLS_RECHECK),
            };
            if let Some(wait) = wait {
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
            let (_, current) = tls.current();
            let renewed = tokio::select! {
                r = crate::enroll::renew(&current, &self.config.collector, tls.key_path()) => r,
                () = shutdown.cancelled() => return,
            };
            let delay = match renewed.and_then(|pem| {
                crate::enroll::write_file(tls.cert_path(), pem.as_bytes(), 0o644).map(|()| pem)
            }) {
                Ok(pem) => {
                    let not_after = crate::enroll::validity(pem.as_bytes())
                        .ok()
                        .and_then(|(_, na)| na.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs());
                    tracing::info!(not_after_unix = not_after, "client certificate renewed");
                    self.metrics.renewed();
                    backoff.reset();
                    continue;
                }
                Err(err) => {
                    let left = due
                        .as_ref()
                        .ok()
                        .and_then(|(_, na)| na.duration_since(now).ok())
                        .unwrap_or_default();
                    tracing::warn!(error = %err, cause = %source_chain(&err), expires_in_secs = left.as_secs(), "certificate renewal failed; will retry");
                    backoff.next_delay()
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn send_loop(
        self,
        tls: Arc<TlsSource>,
        shutdown: CancellationToken,
    ) -> Result<(), AgentError> {
        let urls = self.config.collector.clone();
        let mut backoff = Backoff::new(
            DEFAULT_BACKOFF_BASE,
            Duration::from_secs(self.config.max_backoff_secs),
        );
        let mut idx = 0usize;
        loop {
            let url = &urls[idx % urls.len()];
            let (generation, client_tls) = tls.current();
            let connected = tokio::select! {
                c = client_tls.connect(url) => c,
                () = shutdown.cancelled() => return Ok(()),
            };
            match connected {
                Ok(channel) => {
                    tracing::info!(collector = %url, "connected");
                    let mut raw = tonic::client::Grpc::new(channel.clone())
                        .max_decoding_message_size(MAX_ACK_BYTES);
                    let mut client =
                        IngestClient::new(channel).max_decoding_message_size(MAX_ACK_BYTES);
                    let fresh = || tls.generation() != generation;
                    match self
                        .deliver(&mut client, &mut raw, &mut backoff, &shutdown, &fresh)
                        .await?
                    {
                        Delivery::Shutdown => return Ok(()),
                        Delivery::NewCertificate => {
                            tracing::info!(collector = %url, "reconnecting with the new client certificate");
                            // Same collector, at once: nothing failed.
                            continue;
                        }
                        Delivery::Broken(status) => {
                            self.metrics.send_failed();
                            // A refused client certificate shows as "operation was canceled" or
                            // a transport error: ask the collector why, in a bare handshake.
                            let tls_reason = match status.code() {
                                tonic::Code::Unavailable
                                | tonic::Code::Unknown
                                | tonic::Code::Cancelled => tls.diagnose(url).await,
                                _ => None,
                            };
                            match tls_reason {
                                Some(reason) => {
                                    tracing::warn!(collector = %url, reason = %reason, code = ?status.code(), error = %status.message(), "delivery failed, TLS refused: {reason}; reconnecting")
                                }
                                None => {
                                    tracing::warn!(collector = %url, code = ?status.code(), error = %status.message(), "delivery failed; reconnecting")
                                }
                            }
                        }
                    }
                }
                Err(err) => {
                    self.metrics.send_failed();
                    let reason = match sov_common::tls_diagnose::explain(
                        &err,
                        "the collector's certificate",
                    ) {
                        Some(r) => Some(r),
                        None => tls.diagnose(url).await,
                    };
                    match reason {
                        Some(reason) => {
                            tracing::warn!(collector = %url, reason = %reason, error = %err, cause = %source_chain(&err), "cannot connect, TLS refused: {reason}")
                        }
                        None => {
                            tracing::warn!(collector = %url, error = %err, cause = %source_chain(&err), "cannot connect")
                        }
                    }
                }
            }
            idx = idx.wrapping_add(1);
            let delay = backoff.next_delay();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Deliver spooled reports in order on one connection until it breaks or we shut down.
    async fn deliver(
        &self,
        client: &mut IngestClient<tonic::transport::Channel>,
        raw: &mut tonic::client::Grpc<tonic::transport::Channel>,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
        new_certificate: &(dyn Fn() -> bool + Sync),
    ) -> Result<Delivery, AgentError> {
        loop {
            if new_certificate() {
                return Ok(Delivery::NewCertificate);
            }
            let spool = self.spool.clone();
            let next = tokio::task::spawn_blocking(move || {
                let mut s = lock(&spool);
                s.peek().map(|rec| {
                    rec.map(|r| {
                        let gaps = s.gaps_for(r.seq);
                        (r, gaps)
                    })
                })
            })
            .await
            .map_err(|e| AgentError::Join(e.to_string()))?;
            let (record, gaps) = match next {
                Ok(Some(x)) => x,
                Ok(None) => {
                    tokio::select! {
                        () = self.wake.notified() => continue,
                        () = shutdown.cancelled() => return Ok(Delivery::Shutdown),
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, "cannot read spool; retrying");
                    if self.pause(shutdown).await {
                        return Ok(Delivery::Shutdown);
                    }
                    continue;
                }
            };
            let seq = record.seq;
            let limit = self.collector_limit.load(Ordering::Relaxed);
            // The common case: the spooled bytes go out as they are, with the sequence number
            // and the gaps after them (no decoding, copying and encoding the report again).
            let body = crate::transport::with_seq_and_gaps(
                record.payload,
                seq,
                gaps.iter().map(gap_to_pb).collect(),
            );
            let mut refused: Option<tonic::Status> = None;
            let mut sent: Option<pb::Ack> = None;
            if limit == 0 || body.len() as u64 <= limit {
                let pushed = tokio::select! {
                    r = crate::transport::push_encoded(raw, body.clone()) => r,
                    () = shutdown.cancelled() => return Ok(Delivery::Shutdown),
                };
                match pushed {
                    Ok(ack) => sent = Some(ack),
                    Err(status) if withholding_helps(status.code()) => refused = Some(status),
                    Err(status) => return Ok(Delivery::Broken(status)),
                }
            }
            let mut requeue: Vec<String> = Vec::new();
            let outcome = match sent {
                Some(ack) => Ok(ack),
                // Known too large, or refused: decoded (with its seq and gaps), trimmed and
                // sent again.
                None => {
                    let mut report = match pb::Report::decode(body) {
                        Ok(r) => r,
                        Err(err) => {
                            // The checksum passed, so this is a bug in an older agent version:
                            // skip it as a gap so that the collector knows exactly what is
                            // missing.
                            tracing::error!(seq, error = %err, "spooled report does not decode; dropping it");
                            self.give_up(
                                seq,
                                GapKind::Corrupt,
                                &format!("does not decode: {err}"),
                                shutdown,
                            )
                            .await;
                            continue;
                        }
                    };
                    if refused.is_none() && limit > 0 && report.encoded_len() as u64 > limit {
                        // Known too large: trim before the collector has to say so.
                        let message = format!(
                            "report of {} bytes is larger than the collector's max_report_bytes {limit}",
                            report.encoded_len()
                        );
                        if let Some(w) = crate::shape::withhold(
                            &mut report,
                            Code::ResourceExhausted,
                            &message,
                            limit,
                        ) {
                            requeue.extend(w.requeue);
                        }
                    }
                    let mut steps = 0usize;
                    loop {
                        let status = match refused.take() {
                            Some(status) => status,
                            None => {
                                let pushed = tokio::select! {
                                    r = client.push(report.clone()) => r,
                                    () = shutdown.cancelled() => return Ok(Delivery::Shutdown),
                                };
                                match pushed {
                                    Ok(ack) => break Ok(ack.into_inner()),
                                    Err(status) => status,
                                }
                            }
                        };
                        if !withholding_helps(status.code()) {
                            return Ok(Delivery::Broken(status));
                        }
                        steps += 1;
                        let trimmed = (steps <= MAX_WITHHOLD_STEPS)
                            .then(|| {
                                crate::shape::withhold(
                                    &mut report,
                                    status.code(),
                                    status.message(),
                                    limit,
                                )
                            })
                            .flatten();
                        match trimmed {
                            Some(w) => {
                                self.metrics.withheld();
                                tracing::warn!(seq, code = ?status.code(), error = %status.message(), withheld = ?report.withheld.iter().map(|w| (&w.kind, w.count)).collect::<Vec<_>>(), "collector refused report; sending it again with items withheld");
                                requeue.extend(w.requeue);
                            }
                            None => break Err(status),
                        }
                    }
                }
            };
            match outcome {
                Ok(ack) => {
                    if ack.seq != seq {
                        tracing::warn!(sent = seq, acked = ack.seq, "collector acked another seq");
                    }
                    self.collector_limit
                        .store(ack.max_report_bytes, Ordering::Relaxed);
                    self.weights
                        .set_hints(Hint::from_ack(&ack.restricted_models));
                    if !requeue.is_empty() {
                        self.weights.requeue(&requeue);
                    }
                    // Gaps the collector refused were declared as withheld instead; they
                    // are cleared like carried ones.
                    let carried = gaps;
                    if !self.ack(seq, carried, shutdown).await {
                        return Ok(Delivery::Shutdown);
                    }
                    self.metrics.acked();
                    backoff.reset();
                }
                Err(status) => {
                    // Refused even with every optional item withheld: the report itself (its
                    // node facts) is unacceptable. Give the seq up, saying why.
                    tracing::error!(seq, code = ?status.code(), error = %status.message(), "collector refused report with nothing left to withhold; giving it up as a gap");
                    let detail = format!("{:?}: {}", status.code(), status.message());
                    self.give_up(seq, GapKind::Refused, &detail, shutdown).await;
                }
            }
        }
    }

    /// Sleeps [`SPOOL_RETRY`]; true when shutdown came first.
    async fn pause(&self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = tokio::time::sleep(SPOOL_RETRY) => false,
            () = shutdown.cancelled() => true,
        }
    }

    /// Acks `seq` in the spool, retrying while the spool fails (a full disk). The report is
    /// stored at the collector, so until the ack is written it would only be sent again as a
    /// duplicate. False on shutdown.
    async fn ack(&self, seq: u64, carried: Vec<GapRange>, shutdown: &CancellationToken) -> bool {
        loop {
            let spool = self.spool.clone();
            let c = carried.clone();
            let done =
                tokio::task::spawn_blocking(move || lock(&spool).ack_carrying(seq, &c)).await;
            match done {
                Ok(Ok(())) => return true,
                Ok(Err(err)) => {
                    tracing::error!(seq, error = %err, cause = %source_chain(&err), "cannot record the ack in the spool; retrying")
                }
                Err(err) => tracing::error!(seq, error = %err, "spool task failed; retrying"),
            }
            if self.pause(shutdown).await {
                return false;
            }
        }
    }

    /// Gives `seq` up as a gap of `kind`, retrying while the spool fails.
    async fn give_up(&self, seq: u64, kind: GapKind, detail: &str, shutdown: &CancellationToken) {
        loop {
            let spool = self.spool.clone();
            let d = detail.to_owned();
            let done = tokio::task::spawn_blocking(move || lock(&spool).skip(seq, kind, &d)).await;
            match done {
                Ok(Ok(())) => return,
                Ok(Err(err)) => {
                    tracing::error!(seq, error = %err, "cannot record the gap in the spool; retrying")
                }
                Err(err) => tracing::error!(seq, error = %err, "spool task failed; retrying"),
            }
            if self.pause(shutdown).await {
                return;
            }
        }
    }
}

/// A refusal that a smaller report may not get: the report is trimmed and sent again.
fn withholding_helps(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
    )
}

enum Delivery {
    Shutdown,
    /// The TLS material changed: reconnect with it.
    NewCertificate,
    Broken(tonic::Status),
}

fn gap_to_pb(g: &GapRange) -> pb::Gap {
    let reason = match g.reason {
        GapKind::SpoolFull => pb::GapReason::SpoolFull,
        GapKind::Corrupt => pb::GapReason::Corrupt,
        GapKind::TooLarge => pb::GapReason::TooLarge,
        GapKind::Refused => pb::GapReason::Refused,
    };
    pb::Gap {
        first_seq: g.first_seq,
        last_seq: g.last_seq,
        reason: reason as i32,
        dropped_unix_ms: g.dropped_unix_ms,
        detail: g.detail.clone(),
    }
}

/// The causes of an error, joined, for one log line.
pub use sov_common::error::source_chain;
