//! Network flows: bytes sent and received per process and remote endpoint, per interval.
//!
//! Parts, one concern each:
//! - [`diag`]: sock_diag netlink dump of TCP and UDP sockets (IPv4 and IPv6) with `tcp_info`
//!   (`bytes_acked`, `bytes_received`, `min_rtt`, `rtt`), and the message decoder;
//! - [`destroy`]: the listener of the kernel's sock_diag destroy notifications, on its own
//!   thread, which delivers each closed socket's final counters;
//! - [`owners`]: socket inode → pid through `/proc/<pid>/fd`, cached so that a steady node reads
//!   no link at all;
//! - [`procnet`]: the `/proc/net/{tcp,tcp6,udp,udp6}` fallback when netlink is refused (no
//!   byte counters there);
//! - [`flows`]: per-socket deltas between samples and their aggregation into `pb::Flow`s.
//!
//! [`NetCollector`] ties them together: [`NetCollector::sample`] takes one sample,
//! [`NetCollector::take`] hands out the flows accumulated since the previous take.
//! [`NetHandle::spawn`] runs it on its own thread every `interval_secs`, and in between folds in
//! destroy events every [`ABSORB_PERIOD`] so that the event queue stays short.
//!
//! # What can still be missed
//!
//! Measured on this development machine (kernel 6.18, root); see the tests and
//! `tests/examples/bench_flows.rs`.
//! - **Connections that open and close between two samples** are caught by the destroy events,
//!   with their full counters, but their **owner is unknown** (the event carries no inode and the
//!   descriptor is already closed): they are reported with `pid = 0, owner_unknown = true`.
//! - **No destroy subscription** (netlink filtered by seccomp/LSM, kernel without the groups):
//!   `NetStatus::destroy_events` is false and `reason` says why; such short connections are then
//!   not seen at all, and a connection that closes loses its bytes since the last sample; each
//!   such closed TCP socket is counted in `NetStatus::missed_final`.
//! - **Overrun under a burst**: when the listener's receive buffer fills the kernel drops events
//!   (`ENOBUFS`); when the queue to the collector fills, events are dropped too. Each occurrence
//!   is counted in `NetStatus::destroy_overruns` (how many events one `ENOBUFS` lost is not
//!   knowable); known sockets whose event was lost later count in `missed_final`; unknown ones
//!   are invisible.
//! - **A reset socket whose descriptor stays open** leaves the dump but is freed (and announced)
//!   only when its process closes it: it waits up to [`flows::VANISHED_KEEP_MS`], then counts as
//!   missed.
//! - **Owners invisible to the agent** (no root: `/proc/<pid>/fd` of other users is unreadable)
//!   are reported with `owner_unknown = true`, never dropped; `NetStatus::unknown_owners` counts
//!   them.
//! - **Other network namespaces** (containers with their own netns) are not seen: sock_diag and
//!   `/proc/net` only show the namespace the agent runs in.
//! - **UDP bytes** are never known (sock_diag has no UDP counters): connected UDP sockets (QUIC,
//!   DNS through `connect`) appear as flows with `bytes_known = false`; unconnected UDP sockets
//!   (`sendto` to many peers) have no remote endpoint and appear in no flow.
//! - **A sample that falls back** to `/proc/net` (a netlink dump failed) restarts the baseline
//!   (cookies and `/proc/net` inodes do not match): the bytes of the interval after each switch
//!   between the two modes are not counted; `NetStatus::sample_errors` counts such samples.
//! - **The `/proc/net` fallback** has no counters at all: every flow has `bytes_known = false`
//!   and `NetStatus::mode == "proc-fallback"` with the reason.

pub mod destroy;
pub mod diag;
pub mod flows;
pub mod owners;
pub mod procnet;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sov_proto::pb;

use crate::collect::net::destroy::DestroyListener;
use crate::collect::net::diag::Dumper;
use crate::collect::net::flows::{Contribution, Filter, FlowTable, Tracker};
use crate::collect::net::owners::OwnerCache;
use crate::config::NetConfig;

/// `NetStatus::mode` when sock_diag netlink answers.
pub const MODE_NETLINK: &str = "netlink";
/// `NetStatus::mode` when the sample came from `/proc/net`.
pub const MODE_PROC_FALLBACK: &str = "proc-fallback";
/// `NetStatus::mode` when `[net] enabled = false`.
pub const MODE_DISABLED: &str = "disabled";
/// Where the kernel's process table is mounted.
pub const DEFAULT_PROC_ROOT: &str = "/proc";
/// How often the sampling thread folds in destroy events between two samples.
pub const ABSORB_PERIOD: Duration = Duration::from_millis(250);
/// The pending flow table holds at most this many times `max_flows_per_report` distinct flows
/// (and at least [`MIN_TABLE_FLOWS`]); beyond it new flows go to their "other" flow at once.
pub const TABLE_FLOWS_FACTOR: usize = 2;
/// Lower bound of the pending flow table.
pub const MIN_TABLE_FLOWS: usize = 1024;

/// The state of flow observation, with counters since the previous take.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetStatus {
    /// "netlink" or "proc-fallback" (of the latest sample), or "disabled".
    pub mode: String,
    /// Why the mode is degraded (fallback, or no destroy events); empty when all is well.
    pub reason: String,
    /// Sockets in the latest sample (listeners included).
    pub sockets: usize,
    /// Sockets of the latest sample whose owning process could not be seen.
    pub unknown_owners: usize,
    /// Destroy events folded in since the previous take.
    pub destroyed_seen: u64,
    /// True when subscribed to the sock_diag destroy groups.
    pub destroy_events: bool,
    /// Flows summed into an "other" flow (or dropped) for `max_flows_per_report` since the
    /// previous take.
    pub dropped_flows: u64,
    /// Samples that failed (or fell back) since the previous take.
    pub sample_errors: u64,
    /// Closed TCP sockets whose bytes since the sample before their close were not counted
    /// (their destroy event never came), since the previous take.
    pub missed_final: u64,
    /// Destroy-event losses since the previous take: `ENOBUFS` reports (each an unknown number
    /// of events) plus events dropped because the agent's queue was full.
    pub destroy_overruns: u64,
}

/// Construction options beyond the configuration (tests, tools).
#[derive(Debug, Clone)]
pub struct Options {
    /// Use `/proc/net` even when netlink works.
    pub force_proc_fallback: bool,
    /// Where `/proc` is (for `net/*` and `<pid>/fd`).
    pub proc_root: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            force_proc_fallback: false,
            proc_root: PathBuf::from(DEFAULT_PROC_ROOT),
        }
    }
}

/// One socket as observed (netlink dump, destroy event, or `/proc/net` line).
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedSocket {
    pub protocol: pb::Protocol,
    /// Kernel socket state (`TCP_*`; for UDP 1 = connected, 7 = unconnected).
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Socket inode; 0 when the socket has no file (orphaned, destroy events).
    pub inode: u32,
    /// sock_diag cookie; 0 from `/proc/net`.
    pub cookie: u64,
    /// TCP counters from `tcp_info` (netlink only).
    pub tcp: Option<TcpCounters>,
}

/// The `tcp_info` fields used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpCounters {
    /// `tcpi_bytes_acked`: bytes sent and acknowledged (SYN and FIN count one each).
    pub bytes_acked: u64,
    /// `tcpi_bytes_received`.
    pub bytes_received: u64,
    /// `tcpi_min_rtt`, microseconds.
    pub min_rtt_us: u32,
    /// `tcpi_rtt` (smoothed RTT), microseconds.
    pub srtt_us: u32,
}

#[derive(Debug)]
struct Shared {
    table: FlowTable,
    status: NetStatus,
    max_flows: usize,
}

impl Shared {
    fn take(&mut self) -> (Vec<pb::Flow>, NetStatus) {
        let (flows, dropped) = self.table.take(self.max_flows);
        self.status.dropped_flows += dropped;
        let status = self.status.clone();
        let s = &mut self.status;
        s.destroyed_seen = 0;
        s.dropped_flows = 0;
        s.sample_errors = 0;
        s.missed_final = 0;
        s.destroy_overruns = 0;
        (flows, status)
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The current time in Unix milliseconds.
pub use sov_common::clock::now_unix_ms;

/// The whole error chain on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Samples sockets and accumulates flows. `Send`: it moves to the sampling thread.
#[derive(Debug)]
pub struct NetCollector {
    enabled: bool,
    proc_root: PathBuf,
    dumper: Option<Dumper>,
    /// Why netlink is not used at all (forced, or refused when opening).
    no_netlink: Option<String>,
    destroy: Option<DestroyListener>,
    /// Why there are no destroy events, when there are none.
    no_destroy: Option<String>,
    /// Destroy losses already reported (the listener's counters are cumulative).
    destroy_losses_seen: u64,
    owners: OwnerCache,
    tracker: Tracker,
    /// Mode of the previous sample; a change restarts the baseline.
    last_mode: Option<&'static str>,
    shared: Arc<Mutex<Shared>>,
    capacity_hint: usize,
}

impl NetCollector {
    /// A collector for `cfg`; never fails: without netlink it uses `/proc/net` and says why.
    pub fn new(cfg: &NetConfig) -> Self {
        Self::with_options(cfg, Options::default())
    }

    /// A collector with explicit [`Options`].
    pub fn with_options(cfg: &NetConfig, opts: Options) -> Self {
        let filter = Filter {
            include_loopback: cfg.include_loopback,
            include_link_local: cfg.include_link_local,
        };
        let max_entries = cfg
            .max_flows_per_report
            .saturating_mul(TABLE_FLOWS_FACTOR)
            .max(MIN_TABLE_FLOWS);
        let mut status = NetStatus::default();
        let (dumper, no_netlink) = if !cfg.enabled {
            (None, Some("net.enabled = false".to_owned()))
        } else if opts.force_proc_fallback {
            (None, Some("netlink not used: forced by options".to_owned()))
        } else {
            match Dumper::open() {
                Ok(d) => (Some(d), None),
                Err(e) => (None, Some(format!("netlink refused: {}", chain(&e)))),
            }
        };
        let (destroy, no_destroy) = match (&dumper, &no_netlink) {
            (Some(_), _) => match DestroyListener::start() {
                Ok(l) => (Some(l), None),
                Err(e) => (
                    None,
                    Some(format!(
                        "no destroy events ({}): connections opened and closed between two \
                         samples are not seen, and a closed connection's last bytes are lost",
                        chain(&e)
                    )),
                ),
            },
            (None, reason) => (None, reason.clone()),
        };
        if let Some(e) = &no_destroy {
            tracing::warn!(reason = %e, "network flows degraded");
        }
        status.mode = if !cfg.enabled {
            MODE_DISABLED
        } else if dumper.is_some() {
            MODE_NETLINK
        } else {
            MODE_PROC_FALLBACK
        }
        .to_owned();
        status.reason = no_netlink
            .clone()
            .or_else(|| no_destroy.clone())
            .unwrap_or_default();
        status.destroy_events = destroy.is_some();
        Self {
            enabled: cfg.enabled,
            owners: OwnerCache::new(&opts.proc_root),
            proc_root: opts.proc_root,
            dumper,
            no_netlink,
            destroy,
            no_destroy,
            destroy_losses_seen: 0,
            tracker: Tracker::default(),
            last_mode: None,
            shared: Arc::new(Mutex::new(Shared {
                table: FlowTable::new(filter, max_entries),
                status,
                max_flows: cfg.max_flows_per_report,
            })),
            capacity_hint: 0,
        }
    }

    /// The owner cache's walk statistics (for benchmarks and logs).
    pub fn owner_stats(&self) -> owners::WalkStats {
        self.owners.stats()
    }

    /// Take one sample now: dump the sockets, compute the deltas since the previous sample,
    /// fold in destroyed sockets' final deltas, and add everything to the pending flows.
    ///
    /// The very first sample (and the first after a switch between netlink and `/proc/net`) is
    /// a baseline: it contributes nothing. Afterwards a socket absent from the previous sample
    /// contributes its full counters (it was created, or completed its handshake, since).
    pub fn sample(&mut self, now_unix_ms: i64) {
        if !self.enabled {
            return;
        }
        let mut socks = Vec::with_capacity(self.capacity_hint);
        let mut errors = 0u64;
        let mut reason = self.no_netlink.clone();
        let mut mode = MODE_PROC_FALLBACK;
        if let Some(d) = self.dumper.as_mut() {
            match d.dump_all(&mut socks) {
                Ok(()) => mode = MODE_NETLINK,
                Err(e) => {
                    errors += 1;
                    socks.clear();
                    let r = format!("netlink dump failed: {}", chain(&e));
                    tracing::warn!(reason = %r, "falling back to /proc/net for this sample");
                    reason = Some(r);
                }
            }
        }
        if mode == MODE_PROC_FALLBACK {
            match procnet::read_all(&self.proc_root) {
                Ok((v, _bad)) => socks = v,
                Err(e) => {
                    let mut sh = lock(&self.shared);
                    sh.status.sample_errors += errors + 1;
                    sh.status.mode = MODE_PROC_FALLBACK.to_owned();
                    let why = format!("cannot read {}/net/tcp: {e}", self.proc_root.display());
                    sh.status.reason = match reason {
                        Some(r) => format!("{r}; {why}"),
                        None => why,
                    };
                    return;
                }
            }
        }
        if self.last_mode != Some(mode) {
            // Cookies and /proc/net keys do not match: start a new baseline.
            self.tracker = Tracker::default();
            self.last_mode = Some(mode);
        }
        self.capacity_hint = socks.len() + socks.len() / 8;

        let live: HashSet<u32> = socks.iter().map(|s| s.inode).filter(|i| *i != 0).collect();
        self.owners.refresh(&live, Instant::now());
        let mut contributions = Vec::new();
        let owners = &self.owners;
        let summary = self.tracker.observe_dump(
            &socks,
            now_unix_ms,
            &|ino| owners.owner(ino),
            &mut contributions,
        );
        let netlink = mode == MODE_NETLINK;
        // Destroy events after the dump: a socket freed during the dump may be in it; its
        // event then counts final − dumped counters (the dump was folded in first).
        let destroyed = if netlink {
            self.absorb_into(now_unix_ms, &mut contributions)
        } else {
            0
        };
        let subscribed = netlink && self.destroy.is_some();
        let missed = self.tracker.finish(now_unix_ms, subscribed);
        let losses = self.destroy_losses();

        let mut sh = lock(&self.shared);
        for c in &contributions {
            sh.table.add(c);
        }
        let st = &mut sh.status;
        st.mode = mode.to_owned();
        st.reason = reason
            .or_else(|| self.no_destroy.clone().filter(|_| netlink))
            .unwrap_or_default();
        st.sockets = socks.len();
        st.unknown_owners = summary.unknown_owners;
        st.destroyed_seen += destroyed as u64;
        st.destroy_events = subscribed;
        st.sample_errors += errors;
        st.missed_final += missed;
        st.destroy_overruns += losses;
    }

    /// Fold in the destroy events received since the last sample (called between samples by
    /// the sampling thread so that the queue stays short).
    pub fn absorb_destroyed(&mut self, now_unix_ms: i64) {
        if self.last_mode != Some(MODE_NETLINK) {
            return;
        }
        let mut contributions = Vec::new();
        let n = self.absorb_into(now_unix_ms, &mut contributions);
        let losses = self.destroy_losses();
        if n == 0 && losses == 0 {
            return;
        }
        let mut sh = lock(&self.shared);
        for c in &contributions {
            sh.table.add(c);
        }
        sh.status.destroyed_seen += n as u64;
        sh.status.destroy_overruns += losses;
    }

    fn absorb_into(&mut self, now_unix_ms: i64, out: &mut Vec<Contribution>) -> usize {
        let Some(l) = &self.destroy else {
            return 0;
        };
        let mut events = Vec::new();
        l.drain(&mut events);
        self.tracker.absorb_destroyed(&events, now_unix_ms, out);
        events.len()
    }

    fn destroy_losses(&mut self) -> u64 {
        let Some(l) = &self.destroy else {
            return 0;
        };
        let s = l.stats();
        let total = s.overruns.load(Ordering::Relaxed) + s.queue_full.load(Ordering::Relaxed);
        let new = total.saturating_sub(self.destroy_losses_seen);
        self.destroy_losses_seen = total;
        new
    }

    /// Flows accumulated since the previous take (aggregated, at most `max_flows_per_report`,
    /// largest first) and the status (counters since the previous take).
    pub fn take(&mut self) -> (Vec<pb::Flow>, NetStatus) {
        lock(&self.shared).take()
    }

    /// A handle on this collector's pending flows, for another thread.
    pub fn handle(&self) -> NetHandle {
        NetHandle {
            shared: self.shared.clone(),
            sampler: None,
        }
    }
}

/// The report builder's side of a [`NetCollector`] running on its own thread.
#[derive(Debug, Clone)]
pub struct NetHandle {
    shared: Arc<Mutex<Shared>>,
    /// How to ask the sampler thread for a sample now (absent for a collector without one).
    sampler: Option<SamplerLink>,
}

/// The sampler thread's request channel and its count of samples taken.
#[derive(Debug, Clone)]
struct SamplerLink {
    request: std::sync::mpsc::SyncSender<()>,
    samples: Arc<std::sync::atomic::AtomicU64>,
}

/// How long [`NetHandle::take_fresh`] waits for the sample it asked for.
pub const FRESH_SAMPLE_WAIT: Duration = Duration::from_millis(500);

impl NetHandle {
    /// Start a collector on its own thread ("sov-net"): a baseline sample at once, then one
    /// sample every `cfg.interval_secs` (at least 1), destroy events folded in every
    /// [`ABSORB_PERIOD`] in between, until `stop` is set.
    ///
    /// # Errors
    ///
    /// The operating system's error when it cannot create the thread.
    pub fn spawn(
        cfg: NetConfig,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<(NetHandle, JoinHandle<()>)> {
        let mut collector = NetCollector::new(&cfg);
        let (request, requests) = std::sync::mpsc::sync_channel(1);
        let samples = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut handle = collector.handle();
        handle.sampler = Some(SamplerLink {
            request,
            samples: samples.clone(),
        });
        let interval = Duration::from_secs(cfg.interval_secs.max(1));
        let thread = std::thread::Builder::new()
            .name("sov-net".into())
            .spawn(move || {
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now >= next {
                        collector.sample(now_unix_ms());
                        samples.fetch_add(1, Ordering::Release);
                        next += interval;
                        if next <= now {
                            next = now + interval;
                        }
                    } else {
                        collector.absorb_destroyed(now_unix_ms());
                        let wait = (next - now).min(ABSORB_PERIOD);
                        match requests.recv_timeout(wait) {
                            // Sample at once; the periodic schedule restarts from this sample,
                            // so asking costs no extra samples over time.
                            Ok(()) => next = Instant::now(),
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                                std::thread::sleep(wait);
                            }
                        }
                    }
                }
            })?;
        Ok((handle, thread))
    }

    /// Flows accumulated since the previous take, and the status.
    pub fn take(&self) -> (Vec<pb::Flow>, NetStatus) {
        lock(&self.shared).take()
    }

    /// Ask the sampler thread for a sample now, wait for it (at most
    /// [`FRESH_SAMPLE_WAIT`]), then [`NetHandle::take`]: a report carries the bytes moved up to
    /// the moment it is built, not up to the last periodic sample (breach latency is one report
    /// interval, not two). The sampler's next periodic sample comes an interval after this one.
    pub async fn take_fresh(&self) -> (Vec<pb::Flow>, NetStatus) {
        if let Some(link) = &self.sampler {
            let before = link.samples.load(Ordering::Acquire);
            if link.request.try_send(()).is_ok() {
                let deadline = Instant::now() + FRESH_SAMPLE_WAIT;
                while link.samples.load(Ordering::Acquire) == before && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        self.take()
    }

    /// Owners of the pending flows (for the process list).
    pub fn pids(&self) -> Vec<u32> {
        lock(&self.shared).table.pids()
    }
}

#[cfg(test)]
mod tests;
