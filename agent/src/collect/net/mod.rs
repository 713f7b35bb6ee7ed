//! Network flows: bytes sent and received per process and remote endpoint, per interval.
//!
//! Parts, one concern each:
//! - [`netns`]: the node's network namespaces (pid → namespace), and the sockets opened inside
//!   one on a helper thread (`setns`);
//! - [`diag`]: sock_diag netlink dump of TCP and UDP sockets (IPv4 and IPv6) with `tcp_info`
//!   (`bytes_acked`, `bytes_received`, `min_rtt`, `rtt`), and the message decoder;
//! - [`destroy`]: the listener of the kernel's sock_diag destroy notifications of every observed
//!   namespace, on one thread, which delivers each closed socket's final counters;
//! - [`owners`]: socket inode → pid through `/proc/<pid>/fd`, cached so that a steady node reads
//!   no link at all;
//! - [`procnet`]: the `/proc/net/{tcp,tcp6,udp,udp6}` fallback when netlink is refused (no
//!   byte counters there);
//! - [`flows`]: per-socket deltas between samples and their aggregation into `pb::Flow`s;
//! - [`sockstat`]: which protocols a namespace holds sockets of (a dump is asked only for
//!   those);
//! - [`conntrack`]: the connection tracking dump (ctnetlink) that gives connected UDP sockets
//!   their byte counts.
//!
//! [`NetCollector`] ties them together, with one socket tracker per network namespace and one
//! owner cache for all (socket inodes are unique across namespaces):
//! [`NetCollector::sample`] takes one sample,
//! [`NetCollector::take`] hands out the flows accumulated since the previous take.
//! [`NetHandle::spawn`] runs it on its own thread every `interval_secs`, and in between folds in
//! destroy events every [`ABSORB_PERIOD`] so that the event queue stays short. A report asks
//! for a fresh sample of the agent's own namespace only ([`NetCollector::sample_own`]); the
//! other namespaces (pods) are sampled every `interval_secs`, so a pod's bytes reach the
//! report that follows their interval's sample (up to `interval_secs` later than the host's).
//!
//! # What a sample costs
//!
//! Every sock_diag dump walks the kernel's node-wide TCP hash table (2^18 buckets and every
//! socket of every namespace), whichever namespace asks. So a namespace whose TCP sockets are
//! the same as at its previous sample — its `inuse`, `ActiveOpens` and `PassiveOpens` counts
//! unchanged ([`sockstat::TcpMark`]) and none of its sockets destroyed since — is not dumped:
//! when no TCP segment came in (`InSegs` unchanged) nothing is asked at all, else its
//! followed sockets whose traffic counts (not loopback unless `include_loopback`) are looked
//! up exactly, by addresses, ports and cookie (a hash lookup each; [`MAX_LOOKUPS`] at most).
//!
//! # What can still be missed
//!
//! Measured on this development machine (kernel 6.18, root); see the tests and
//! `tests/examples/bench_flows.rs`.
//! - **Connections that open and close between two samples** are caught by the destroy events,
//!   with their full counters; the event carries no inode and the descriptor is already closed,
//!   so their owner comes from an **owner glance**: once a TCP connection to a remote closed
//!   unseen in a namespace, the sampling thread dumps that namespace's TCP sockets every
//!   [`ABSORB_PERIOD`] for [`GLANCE_FOR`], when a connection opened there since its last dump
//!   and within the glances' CPU budget ([`glance`]), and remembers the owner of each
//!   connection no sample has seen ([`NetCollector::glance`]). A connection that opens and
//!   closes within one glance period (about 250 ms), the first ones after a quiet spell, and
//!   those of a namespace whose glance the budget skipped, stay **without owner**: reported
//!   with `pid = 0, owner_unknown = true` and counted in `NetStatus::short_unknown_owners`.
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
//! - **Other network namespaces** (containers, pods) are seen by entering each distinct
//!   `/proc/<pid>/ns/net` once ([`netns`]), which needs `CAP_SYS_ADMIN`; without it they are
//!   read from `/proc/<pid>/net` with no byte counters (`NetStatus::namespaces_fallback`). A
//!   namespace that holds sockets but no process (only bind-mounted, `ip netns add` without a
//!   process) is not found; beyond `[net] max_namespaces` namespaces the ones with the fewest
//!   processes are left out (`NetStatus::namespaces_skipped`). A namespace's first sample is a
//!   baseline: bytes moved before it was first seen are not counted.
//! - **UDP bytes** come from connection tracking ([`conntrack`]): a connected UDP socket (QUIC,
//!   DNS through `connect`) is matched with its namespace's conntrack entry, and its counters
//!   (IP lengths, less the IP and UDP headers) are its bytes (`measurement = CONNTRACK`). Where
//!   accounting is off (`nf_conntrack_acct = 0`, the default) or netfilter does not track the
//!   namespace, the flow is still listed with its destination and process but without bytes
//!   (`UNMEASURED`), and the agent logs once per namespace how to turn accounting on. An entry
//!   reused by a later socket with the same addresses and ports carries the earlier bytes too.
//!   A UDP socket that closes takes its final counters from its entry, which outlives it (the
//!   destroy event carries no UDP counter; the table is dumped again when such events come):
//!   a short-lived connection (a DNS query, a brief QUIC connection) is counted too, with an
//!   unknown owner when it opened and closed between two samples.
//!   Unconnected UDP sockets (`sendto` to many peers) have no remote endpoint in sock_diag and
//!   appear in no flow.
//! - **A sample that falls back** to `/proc/net` (a netlink dump failed) restarts the baseline
//!   (cookies and `/proc/net` inodes do not match): the bytes of the interval after each switch
//!   between the two modes are not counted; `NetStatus::sample_errors` counts such samples.
//! - **The `/proc/net` fallback** has no counters at all: every flow has `bytes_known = false`
//!   and `NetStatus::mode == "proc-fallback"` with the reason.

pub mod conntrack;
pub mod destroy;
pub mod diag;
pub mod flows;
pub mod glance;
pub mod netns;
pub mod owners;
pub mod procnet;
pub mod sockstat;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sov_proto::pb;

use crate::collect::cache;
use crate::collect::containers::Containers;
use crate::collect::error_chain as chain;
use crate::collect::namespaces;
use crate::collect::net::destroy::DestroyListener;
use crate::collect::net::diag::Dumper;
use crate::collect::net::flows::{Contribution, Filter, FlowTable, Scope, Tracker};
use crate::collect::net::netns::NsMap;
use crate::collect::net::owners::OwnerCache;
use crate::collect::proctable::ProcTable;
use crate::config::NetConfig;

/// `NetStatus::mode` when sock_diag netlink answers.
pub const MODE_NETLINK: &str = "netlink";
/// `NetStatus::mode` when the sample came from `/proc/net`.
pub const MODE_PROC_FALLBACK: &str = "proc-fallback";
/// `NetStatus::mode` when `[net] enabled = false`.
pub const MODE_DISABLED: &str = "disabled";
/// Where the kernel's process table is mounted.
pub const DEFAULT_PROC_ROOT: &str = "/proc";
/// How often the sampling thread folds in destroy events between two samples (and, while
/// short connections come, glances at the sockets' owners).
pub const ABSORB_PERIOD: Duration = Duration::from_millis(250);
/// After a TCP connection closed before any sample saw it, the sampling thread glances at the
/// sockets' owners every [`ABSORB_PERIOD`] for this long ([`NetCollector::glance`]), dumping
/// only when a connection opened since ([`glance`]); a node without such connections pays
/// nothing.
pub use glance::GLANCE_FOR;
/// The pending flow table holds at most this many times `max_flows_per_report` distinct flows
/// (and at least [`MIN_TABLE_FLOWS`]); beyond it new flows go to their "other" flow at once.
pub const TABLE_FLOWS_FACTOR: usize = 2;
/// Lower bound of the pending flow table.
pub const MIN_TABLE_FLOWS: usize = 1024;
/// A listing of `/proc` made less than this long ago by another collector is reused (the
/// process table's listing mode).
pub const TABLE_MAX_AGE: Duration = Duration::from_secs(1);
/// A namespace found unchanged by counting the sockets that closed since its mark (not by an
/// unchanged mark alone: [`sockstat::TcpMark::accounts_for`]) is dumped at least this often: a
/// destroy event still on its way when the mark was taken could balance one new connection,
/// which that dump then finds (with all its bytes: a socket new to the tracker counts in full).
pub const LEDGER_DUMP_EVERY: Duration = Duration::from_secs(10);
/// Samples a network namespace may go without any process before its sockets are closed (its
/// last destroy events arrive meanwhile).
pub const NAMESPACE_GRACE_SAMPLES: u32 = 2;

/// The state of flow observation, with counters since the previous take.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetStatus {
    /// "netlink" or "proc-fallback" (of the latest sample of the agent's own namespace), or
    /// "disabled".
    pub mode: String,
    /// Why the mode is degraded (fallback, no destroy events, namespaces that could not be
    /// entered); empty when all is well.
    pub reason: String,
    /// Sockets in the latest sample, all namespaces together (listeners included).
    pub sockets: usize,
    /// Sockets of the latest sample whose owning process could not be seen.
    pub unknown_owners: usize,
    /// Destroy events folded in since the previous take.
    pub destroyed_seen: u64,
    /// True when subscribed to the sock_diag destroy groups (of the agent's own namespace).
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
    /// Network namespaces observed in the latest sample (the agent's own included).
    pub namespaces: usize,
    /// Of those, namespaces read from `/proc/<pid>/net` (no byte counters) because they could
    /// not be entered.
    pub namespaces_fallback: usize,
    /// Namespaces left unobserved because `[net] max_namespaces` was reached.
    pub namespaces_skipped: usize,
    /// Connections that closed before any sample saw them (caught by their destroy event),
    /// since the previous take.
    pub short_connections: u64,
    /// Of those, the ones whose owner no glance saw either (they opened and closed within one
    /// glance period, or the owner is invisible): reported with `owner_unknown`.
    pub short_unknown_owners: u64,
    /// Owner glances taken since the previous take.
    pub glances: u64,
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
    /// Byte counters: `tcp_info`'s for TCP (netlink only); for a connected UDP socket, its
    /// connection tracking entry's payload bytes when accounting is on (min RTT 0).
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
    /// Containers of the pids owning pending flows.
    pid_containers: HashMap<u32, pb::ContainerRef>,
    /// The pod (or container) owning each network namespace key, when one does.
    ns_containers: HashMap<u64, pb::ContainerRef>,
}

impl Shared {
    fn take(&mut self) -> (Vec<pb::Flow>, NetStatus) {
        let (mut flows, dropped) = self.table.take(self.max_flows);
        for f in &mut flows {
            f.container = if f.pid != 0 {
                self.pid_containers.get(&f.pid).cloned()
            } else {
                self.ns_containers.get(&f.netns_inode).cloned()
            };
        }
        self.pid_containers.clear();
        self.status.dropped_flows += dropped;
        let status = self.status.clone();
        let s = &mut self.status;
        s.destroyed_seen = 0;
        s.dropped_flows = 0;
        s.sample_errors = 0;
        s.missed_final = 0;
        s.destroy_overruns = 0;
        s.short_connections = 0;
        s.short_unknown_owners = 0;
        s.glances = 0;
        (flows, status)
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The current time in Unix milliseconds.
pub use sov_common::clock::now_unix_ms;

/// One observed network namespace: how it is read, and its sockets between samples.
#[derive(Debug)]
struct Namespace {
    dumper: Option<Dumper>,
    /// Why netlink is not used in it (forced, refused, or the namespace could not be entered).
    no_netlink: Option<String>,
    /// Listening to its destroy events.
    destroy: bool,
    /// Why there are no destroy events from it.
    no_destroy: Option<String>,
    tracker: Tracker,
    /// Mode of the previous sample; a change restarts the baseline.
    last_mode: Option<&'static str>,
    /// Its processes at the latest discovery (the first is read for `/proc/<pid>/net`).
    pids: Vec<u32>,
    /// Its `net/{sockstat,sockstat6,snmp}` kept open ([`sockstat::NetFiles`]), when there was
    /// room under [`NetCollector::net_files_max`].
    files: Option<sockstat::NetFiles>,
    /// Samples in a row without any process.
    empty_samples: u32,
    /// Its connection tracking socket (UDP bytes), when it could be opened.
    conntrack: Option<conntrack::Conntrack>,
    /// What its conntrack said about its UDP sockets at the last sample that had some.
    udp: Option<conntrack::UdpAccounting>,
    /// When owner glances dump it: a connection closed unseen in it lately, and one opened
    /// since its last dump. Only then: each dump walks the kernel's whole TCP hash table,
    /// whichever namespace asks.
    glance: glance::Pace,
    /// Its [`sockstat::TcpMark`] when its TCP sockets were last dumped (or looked up): while
    /// the mark stays the same and no socket of it is destroyed, its TCP sockets are not
    /// dumped again ([`NetCollector::sample`]).
    tcp_mark: Option<sockstat::TcpMark>,
    /// How its TCP sockets left the hash table since its mark was taken (destroy events),
    /// against which the mark's change is checked ([`sockstat::TcpMark::accounts_for`]).
    closes: flows::TcpCloses,
    /// Possible losses of destroy events since its TCP sockets were last dumped.
    lost: u64,
    /// Its mark (`fresh_sample`) or its glance pace (`fresh_glance`) was just taken: the
    /// destroy events folded in next are of sockets that closed before it (up to then), so
    /// their unseen connections are not counted against the opens since (that would count
    /// an open twice). Cleared by every fold-in.
    fresh_sample: bool,
    fresh_glance: bool,
    /// When its TCP sockets were last dumped.
    last_dump: Option<Instant>,
    /// Its latest sample found its TCP sockets unchanged (no TCP dump).
    steady: bool,
    /// Sockets (listeners included) in its latest dump, and of those the ones without owner.
    sockets: usize,
    unknown_owners: usize,
}

impl Namespace {
    fn new(key: u64) -> Self {
        Self {
            dumper: None,
            no_netlink: None,
            destroy: false,
            no_destroy: None,
            tracker: Tracker::for_netns(key),
            last_mode: None,
            pids: Vec::new(),
            files: None,
            empty_samples: 0,
            conntrack: None,
            udp: None,
            glance: glance::Pace::default(),
            tcp_mark: None,
            closes: flows::TcpCloses::default(),
            lost: 0,
            fresh_sample: false,
            fresh_glance: false,
            last_dump: None,
            steady: false,
            sockets: 0,
            unknown_owners: 0,
        }
    }
}

/// The `net` files of namespace `key` (0: the agent's own, through `/proc/self/net`; else
/// through its first process, checked to be still in it).
fn open_net_files(proc_root: &Path, key: u64, pids: &[u32]) -> Option<sockstat::NetFiles> {
    if key == 0 {
        sockstat::NetFiles::open(&proc_root.join("self").join("net"))
    } else {
        sockstat::NetFiles::open_in(proc_root, *pids.first()?, key)
    }
}

/// Samples sockets and accumulates flows. `Send`: it moves to the sampling thread.
#[derive(Debug)]
pub struct NetCollector {
    enabled: bool,
    all_namespaces: bool,
    max_namespaces: usize,
    /// Namespaces whose `net` files are kept open at most: three descriptors each, within a
    /// sixteenth of the descriptor limit (the training sampler takes another sixteenth).
    net_files_max: usize,
    /// Scratch space for reading those files.
    net_buf: Vec<u8>,
    force_proc_fallback: bool,
    proc_root: PathBuf,
    /// Inode of the agent's own network namespace (0 when unknown).
    own_inode: u64,
    /// By key (0: the agent's own).
    namespaces: HashMap<u64, Namespace>,
    nsmap: NsMap,
    /// The live processes (shared with the agent's other collectors).
    table: ProcTable,
    destroy: Option<DestroyListener>,
    /// Destroy losses already reported (the listener's counters are cumulative).
    destroy_losses_seen: u64,
    owners: OwnerCache,
    shared: Arc<Mutex<Shared>>,
    capacity_hint: usize,
    containers: Option<Containers>,
    /// `[net] conntrack_accounting`: set `nf_conntrack_acct = 1` in observed namespaces.
    conntrack_accounting: bool,
    /// Glance at owners between samples until then (set when a connection closed unseen).
    glance_until: Option<Instant>,
    /// The glances' CPU allowance, all namespaces together.
    glance_budget: glance::Budget,
    /// Which remotes are flows (the pending table's filter): the owners of other connections
    /// are not searched for.
    filter: Filter,
    /// Which namespace glances first next time (in turn).
    glance_turn: usize,
    /// What the latest sample of the other namespaces found (reused by the samples of the
    /// agent's own namespace alone, [`NetCollector::sample_own`]): reasons, namespaces read
    /// from `/proc/net`, namespaces left out.
    others_reasons: Vec<String>,
    others_fallback: usize,
    others_skipped: usize,
    /// The live socket inodes of the other namespaces at their latest sample.
    others_live: HashSet<u32>,
}

/// The agent's own namespace's conntrack socket (switching accounting on when configured).
fn open_conntrack(netns: u64, enable_accounting: bool) -> Option<conntrack::Conntrack> {
    let accounting = enable_accounting.then(conntrack::enable_accounting);
    conntrack_or_log(netns, conntrack::Conntrack::open(), accounting)
}

/// Keep a namespace's conntrack socket, logging why there is none, and the outcome of
/// switching accounting on.
fn conntrack_or_log(
    netns: u64,
    socket: Result<conntrack::Conntrack, conntrack::ConntrackError>,
    accounting: Option<std::io::Result<()>>,
) -> Option<conntrack::Conntrack> {
    match accounting {
        Some(Ok(())) => tracing::info!(
            netns,
            "net.netfilter.nf_conntrack_acct set to 1 ([net] conntrack_accounting = true)"
        ),
        Some(Err(e)) => tracing::warn!(netns, error = %e,
            "cannot set net.netfilter.nf_conntrack_acct ([net] conntrack_accounting = true)"),
        None => {}
    }
    match socket {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::info!(netns, error = %chain(&e),
                "no connection tracking socket: UDP bytes are unmeasured in this namespace");
            None
        }
    }
}

/// Give the connected UDP sockets of a dump their byte counts from the namespace's
/// connection tracking (as counters the tracker turns into deltas, like TCP's); returns what
/// conntrack said, `None` when the dump holds no connected UDP socket.
fn count_udp(
    ct: &mut conntrack::Conntrack,
    socks: &mut [ObservedSocket],
) -> Result<Option<conntrack::UdpAccounting>, conntrack::ConntrackError> {
    use conntrack::UdpAccounting;
    let connected = |s: &ObservedSocket| {
        s.protocol == pb::Protocol::Udp && !s.remote.ip().is_unspecified() && s.remote.port() != 0
    };
    if !socks.iter().any(connected) {
        return Ok(None);
    }
    let mut entries = HashMap::new();
    let left_out = ct.dump_udp(&mut entries)?;
    if left_out > 0 {
        tracing::debug!(
            left_out,
            "conntrack entries over the bound: not measured this sample"
        );
    }
    let (mut counted, mut off) = (false, false);
    for s in socks.iter_mut().filter(|s| connected(s)) {
        match conntrack::socket_bytes(&entries, s.local, s.remote) {
            Some(Ok((sent, received))) => {
                counted = true;
                s.tcp = Some(TcpCounters {
                    bytes_acked: sent,
                    bytes_received: received,
                    min_rtt_us: 0,
                    srtt_us: 0,
                });
            }
            Some(Err(_)) => off = true,
            None => {}
        }
    }
    Ok(Some(if counted {
        UdpAccounting::Counted
    } else if off {
        UdpAccounting::Off
    } else {
        UdpAccounting::Untracked
    }))
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
        let mut own = Namespace::new(0);
        let mut destroy = None;
        if !cfg.enabled {
            own.no_netlink = Some("net.enabled = false".to_owned());
        } else if opts.force_proc_fallback {
            own.no_netlink = Some("netlink not used: forced by options".to_owned());
        } else {
            match Dumper::open() {
                Ok(d) => own.dumper = Some(d),
                Err(e) => own.no_netlink = Some(format!("netlink refused: {}", chain(&e))),
            }
            own.conntrack = open_conntrack(0, cfg.conntrack_accounting);
        }
        if own.dumper.is_some() {
            match DestroyListener::start(0) {
                Ok(l) => {
                    destroy = Some(l);
                    own.destroy = true;
                }
                Err(e) => {
                    own.no_destroy = Some(format!(
                        "no destroy events ({}): connections opened and closed between two \
                         samples are not seen, and a closed connection's last bytes are lost",
                        chain(&e)
                    ));
                }
            }
        } else {
            own.no_destroy.clone_from(&own.no_netlink);
        }
        if let Some(e) = &own.no_destroy {
            tracing::warn!(reason = %e, "network flows degraded");
        }
        let mut status = NetStatus {
            mode: if !cfg.enabled {
                MODE_DISABLED
            } else if own.dumper.is_some() {
                MODE_NETLINK
            } else {
                MODE_PROC_FALLBACK
            }
            .to_owned(),
            reason: own
                .no_netlink
                .clone()
                .or_else(|| own.no_destroy.clone())
                .unwrap_or_default(),
            destroy_events: own.destroy,
            ..NetStatus::default()
        };
        status.namespaces = usize::from(cfg.enabled);
        let mut namespaces = HashMap::new();
        namespaces.insert(0, own);
        Self {
            enabled: cfg.enabled,
            all_namespaces: cfg.all_namespaces,
            max_namespaces: cfg.max_namespaces.max(1),
            net_files_max: crate::collect::descriptor_limit()
                .map_or(0, |l| usize::try_from(l / 16 / 3).unwrap_or(usize::MAX)),
            net_buf: Vec::new(),
            force_proc_fallback: opts.force_proc_fallback,
            owners: OwnerCache::new(&opts.proc_root),
            table: ProcTable::new(&opts.proc_root),
            own_inode: namespaces::own(namespaces::NET).unwrap_or(0),
            proc_root: opts.proc_root,
            namespaces,
            nsmap: NsMap::default(),
            destroy,
            destroy_losses_seen: 0,
            shared: Arc::new(Mutex::new(Shared {
                table: FlowTable::new(filter, max_entries),
                status,
                max_flows: cfg.max_flows_per_report,
                pid_containers: HashMap::new(),
                ns_containers: HashMap::new(),
            })),
            capacity_hint: 0,
            containers: None,
            conntrack_accounting: cfg.conntrack_accounting,
            glance_until: None,
            glance_budget: glance::Budget::default(),
            glance_turn: 0,
            filter,
            others_reasons: Vec::new(),
            others_fallback: 0,
            others_skipped: 0,
            others_live: HashSet::new(),
        }
    }

    /// Follow the processes through `table` (the agent's shared process table) instead of a
    /// table of its own.
    pub fn with_table(mut self, table: ProcTable) -> Self {
        self.table = table;
        self
    }

    /// Name the container (and pod) of every flow's process from `containers`.
    pub fn with_containers(mut self, containers: Containers) -> Self {
        self.containers = Some(containers);
        self
    }

    /// The owner cache's walk statistics (for benchmarks and logs).
    pub fn owner_stats(&self) -> owners::WalkStats {
        self.owners.stats()
    }

    /// Whether the latest sample of network namespace `inode` (0 or the agent's own inode: the
    /// agent's own) found its TCP sockets unchanged and so did not dump them; `None` for a
    /// namespace not observed.
    pub fn sampled_steady(&self, inode: u64) -> Option<bool> {
        let key = if inode == self.own_inode { 0 } else { inode };
        self.namespaces.get(&key).map(|n| n.steady)
    }

    /// Network namespaces observed now (the agent's own included), and of those how many
    /// have destroy events.
    pub fn namespace_count(&self) -> (usize, usize) {
        let with_events = self.namespaces.values().filter(|n| n.destroy).count();
        (self.namespaces.len(), with_events)
    }

    /// Find the node's network namespaces: new ones are opened (entered on a helper thread),
    /// ones without processes for [`NAMESPACE_GRACE_SAMPLES`] samples are closed.
    fn discover(&mut self, now: Instant) -> usize {
        if !self.all_namespaces {
            return 0;
        }
        let live = self.table.live();
        self.nsmap.refresh(&self.proc_root, &live, now);
        let found = self.nsmap.namespaces();
        let own_inode = self.own_inode;
        let own_key = |ino: u64| if ino == own_inode { 0 } else { ino };
        for ns in self.namespaces.values_mut() {
            ns.pids.clear();
        }
        let mut skipped = 0;
        let mut sorted: Vec<(u64, Vec<u32>)> = found.into_iter().collect();
        // Deterministic: the namespaces with the most processes first when over the bound.
        sorted.sort_unstable_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        for (ino, pids) in sorted {
            let key = own_key(ino);
            if let Some(ns) = self.namespaces.get_mut(&key) {
                ns.pids = pids;
                continue;
            }
            if self.namespaces.len() >= self.max_namespaces {
                skipped += 1;
                continue;
            }
            if let Some(ns) = self.open_namespace(ino, pids) {
                self.namespaces.insert(key, ns);
            }
        }
        let mut closed = Vec::new();
        for (key, ns) in &mut self.namespaces {
            if *key == 0 {
                continue;
            }
            if ns.pids.is_empty() {
                ns.empty_samples += 1;
                if ns.empty_samples > NAMESPACE_GRACE_SAMPLES {
                    closed.push(*key);
                }
            } else {
                ns.empty_samples = 0;
            }
        }
        for key in closed {
            if let Some(ns) = self.namespaces.remove(&key)
                && ns.destroy
                && let Some(l) = &self.destroy
            {
                l.remove(key);
            }
            tracing::debug!(
                netns = key,
                "network namespace gone; its sockets are closed"
            );
        }
        skipped
    }

    /// A namespace's sockets, opened inside it; `None` when its process went away meanwhile
    /// (it is tried again at the next sample).
    fn open_namespace(&mut self, ino: u64, pids: Vec<u32>) -> Option<Namespace> {
        let mut ns = Namespace {
            pids,
            ..Namespace::new(ino)
        };
        if self.force_proc_fallback {
            ns.no_netlink = Some("netlink not used: forced by options".to_owned());
            return Some(ns);
        }
        let &pid = ns.pids.first()?;
        match netns::open_in(&self.proc_root, pid, ino, self.conntrack_accounting) {
            Ok(sockets) => {
                ns.dumper = Some(sockets.dumper);
                ns.conntrack = conntrack_or_log(ino, sockets.conntrack, sockets.accounting);
                match (sockets.destroy, &self.destroy) {
                    (Ok(sock), Some(l)) => {
                        l.add(ino, sock);
                        ns.destroy = true;
                    }
                    (Ok(_), None) => {
                        ns.no_destroy = Some("no destroy-event listener".to_owned());
                    }
                    (Err(e), _) => ns.no_destroy = Some(chain(&e)),
                }
            }
            Err(netns::NetnsError::Open { .. } | netns::NetnsError::Moved { .. }) => return None,
            Err(e) => {
                let why = format!("network namespace {ino}: {}", chain(&e));
                tracing::info!(reason = %why, "reading that namespace from /proc/<pid>/net (no byte counts)");
                ns.no_netlink = Some(why);
            }
        }
        Some(ns)
    }

    /// Take one sample now: find the network namespaces, dump each one's sockets, compute the
    /// deltas since the previous sample, fold in destroyed sockets' final deltas, and add
    /// everything to the pending flows.
    ///
    /// The very first sample of a namespace (and the first after a switch between netlink and
    /// `/proc/net`) is a baseline: it contributes nothing. Afterwards a socket absent from the
    /// previous sample contributes its full counters (it was created, or completed its
    /// handshake, since).
    ///
    /// A namespace whose TCP sockets are the same as at its previous sample (its
    /// [`sockstat::TcpMark`] unchanged, none of its sockets destroyed meanwhile) is not dumped
    /// again: every dump walks the kernel's node-wide TCP hash table, whichever namespace asks.
    /// When bytes moved in it (`InSegs` changed), its followed TCP sockets whose traffic is
    /// counted (not loopback, unless `include_loopback`) are looked up exactly instead, at most
    /// [`MAX_LOOKUPS`] of them (beyond, it is dumped).
    pub fn sample(&mut self, now_unix_ms: i64) {
        self.sample_scope(now_unix_ms, true);
    }

    /// A sample of the agent's own network namespace alone (what a report asks for: its
    /// connections' bytes up to the moment it is built); the other namespaces keep their state
    /// until the next [`NetCollector::sample`] (every `[net] interval_secs`).
    pub fn sample_own(&mut self, now_unix_ms: i64) {
        self.sample_scope(now_unix_ms, false);
    }

    fn sample_scope(&mut self, now_unix_ms: i64, others: bool) {
        if !self.enabled {
            return;
        }
        // One refresh of the process table per sample; a listing made by another collector
        // less than a second ago is shared (listing mode only).
        let procs = self.table.refresh(TABLE_MAX_AGE);
        let skipped = if others {
            self.others_skipped = self.discover(Instant::now());
            self.others_skipped
        } else {
            self.others_skipped
        };
        // The destroy events so far are folded in before the marks are read, so that the
        // sockets that closed before are counted against them (sockstat::TcpMark::accounts_for).
        let sampled: Vec<u64> = if others { Vec::new() } else { vec![0] };
        let flush_keys = (!others).then_some(sampled.as_slice());
        if let Some(l) = &self.destroy {
            l.flush(flush_keys);
        }
        // Counted now, folded in after the dumps (a closed socket's direction comes from the
        // listeners the dump finds).
        let early = self.take_events();
        // Lost destroy events (of any namespace) make every namespace dumped in full.
        let mut losses = self.destroy_losses();
        let mut dumps: Vec<(u64, Vec<ObservedSocket>, &'static str, Scope)> =
            Vec::with_capacity(self.namespaces.len());
        let mut errors = 0u64;
        let mut reasons: Vec<(u64, String)> = Vec::new();
        let mut own_failed: Option<String> = None;
        let mut fallback = 0usize;
        let mut keys: Vec<u64> = self
            .namespaces
            .keys()
            .copied()
            .filter(|k| others || *k == 0)
            .collect();
        keys.sort_unstable();
        let mut files_room = self.net_files_max.saturating_sub(
            self.namespaces
                .values()
                .filter(|n| n.files.is_some())
                .count(),
        );
        for key in keys {
            let Some(ns) = self.namespaces.get_mut(&key) else {
                continue;
            };
            let mut socks = Vec::with_capacity(if key == 0 { self.capacity_hint } else { 16 });
            let mut mode = MODE_PROC_FALLBACK;
            let mut scope = Scope::FULL;
            ns.steady = false;
            if let Some(d) = ns.dumper.as_mut() {
                // Only the protocols the namespace holds sockets of (sockstat.rs): a dump walks
                // the node-wide hash tables even for an empty namespace. Its files are kept
                // open while there is room (sockstat::NetFiles), else opened for this sample.
                if ns.files.is_none() && files_room > 0 {
                    ns.files = open_net_files(&self.proc_root, key, &ns.pids);
                    if ns.files.is_some() {
                        files_room -= 1;
                    }
                }
                let transient = match ns.files {
                    Some(_) => None,
                    None => open_net_files(&self.proc_root, key, &ns.pids),
                };
                let files = ns.files.as_ref().or(transient.as_ref());
                let now = Instant::now();
                let in_use = files.and_then(|f| f.in_use(&mut self.net_buf));
                // `snmp` once, for the glance pace and the mark both.
                let snmp = match files {
                    Some(f) if ns.destroy || ns.glance.active(now) => f.snmp(&mut self.net_buf),
                    _ => None,
                };
                ns.glance
                    .before_sample(|| snmp.and_then(glance::parse_opens), now);
                let mark = match (snmp, &in_use) {
                    (Some(text), Some(u)) if ns.destroy => sockstat::mark_of(text, u),
                    _ => None,
                };
                // Unchanged: no socket it has not seen is in its table. Either nothing moved
                // (an exact rule), or every open since is a connection that closed unseen and
                // `inuse` fell by the known sockets that closed — then a dump at least every
                // LEDGER_DUMP_EVERY (an event still on its way may balance a new connection).
                let steady = match (mark, ns.tcp_mark) {
                    (Some(now), Some(then)) => {
                        ns.last_mode == Some(MODE_NETLINK)
                            && ns.tracker.has_baseline()
                            && ns.lost == 0
                            && now.accounts_for(&then, &ns.closes)
                            && (ns.closes == flows::TcpCloses::default()
                                || ns
                                    .last_dump
                                    .is_some_and(|t| t.elapsed() < LEDGER_DUMP_EVERY))
                    }
                    _ => false,
                };
                let mut result = Err(None);
                if steady && let (Some(now), Some(then)) = (mark, ns.tcp_mark) {
                    result =
                        steady_sample(d, &ns.tracker, &self.filter, now, then, in_use, &mut socks);
                    if result.is_ok() {
                        scope = Scope {
                            all_tcp: false,
                            all_udp: in_use.is_some_and(|u| u.udp4 + u.udp6 > 0),
                        };
                    } else {
                        socks.clear();
                    }
                }
                if let Err(why) = &result {
                    if let Some(why) = why {
                        tracing::debug!(netns = key, reason = %why, "exact lookups failed: dumping instead");
                    }
                    let (asked, skipped) = match in_use {
                        Some(u) => {
                            let n = [(false, true), (false, false), (true, true), (true, false)]
                                .iter()
                                .filter(|(v6, tcp)| u.any(*v6, *tcp))
                                .count() as u64;
                            (n, 4 - n)
                        }
                        None => (4, 0),
                    };
                    cache::NAMESPACE_DUMPS.misses(asked);
                    cache::NAMESPACE_DUMPS.hits(skipped);
                    result = d
                        .dump_where(&mut socks, |v6, tcp| in_use.is_none_or(|u| u.any(v6, tcp)))
                        .map_err(Some);
                    if result.is_ok() {
                        ns.lost = 0;
                        ns.last_dump = Some(Instant::now());
                    }
                } else {
                    // The TCP dumps (both families: one walk) were not needed.
                    cache::NAMESPACE_DUMPS.hits(2);
                }
                ns.tcp_mark = if result.is_ok() { mark } else { None };
                // The mark (and the glance pace, read before it) start counting closes anew;
                // the events folded in after the dump are of sockets closed before it.
                ns.closes = flows::TcpCloses::default();
                ns.fresh_sample = true;
                ns.fresh_glance = true;
                ns.steady = scope != Scope::FULL;
                match result {
                    Ok(()) => {
                        mode = MODE_NETLINK;
                        let udp = match ns.conntrack.as_mut() {
                            Some(ct) => count_udp(ct, &mut socks).unwrap_or_else(|e| {
                                tracing::debug!(netns = key, error = %chain(&e), "conntrack dump failed");
                                Some(conntrack::UdpAccounting::Untracked)
                            }),
                            None => None,
                        };
                        if let Some(state) = udp {
                            if state != conntrack::UdpAccounting::Counted {
                                reasons.push((
                                    key,
                                    format!(
                                        "UDP bytes unmeasured in network namespace {key} ({})",
                                        if state == conntrack::UdpAccounting::Off {
                                            "conntrack accounting off"
                                        } else {
                                            "not tracked by netfilter"
                                        }
                                    ),
                                ));
                            }
                            if ns.udp != Some(state) && state != conntrack::UdpAccounting::Counted {
                                let how = conntrack::remedy(state, key, ns.pids.first().copied());
                                tracing::warn!(netns = key, "{how}");
                            }
                            ns.udp = Some(state);
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        socks.clear();
                        scope = Scope::FULL;
                        let r = match e {
                            Some(e) => format!("netlink dump failed: {}", chain(&e)),
                            None => "netlink dump failed".to_owned(),
                        };
                        tracing::warn!(reason = %r, netns = key, "falling back to /proc/net for this sample");
                        reasons.push((key, r));
                    }
                }
            } else if let Some(r) = &ns.no_netlink
                && key != 0
            {
                reasons.push((key, r.clone()));
            }
            if mode == MODE_PROC_FALLBACK {
                if key != 0 {
                    fallback += 1;
                }
                let root = if key == 0 {
                    self.proc_root.clone()
                } else {
                    match ns.pids.first() {
                        Some(pid) => self.proc_root.join(pid.to_string()),
                        // No process left: nothing to read until it is closed.
                        None => continue,
                    }
                };
                match procnet::read_all(&root) {
                    Ok((v, _bad)) => socks = v,
                    Err(e) => {
                        errors += 1;
                        let why = format!("cannot read {}/net/tcp: {e}", root.display());
                        if key == 0 {
                            own_failed = Some(why);
                        }
                        continue;
                    }
                }
            }
            if ns.last_mode != Some(mode) {
                // Cookies and /proc/net keys do not match: start a new baseline.
                ns.tracker = Tracker::for_netns(key);
                ns.last_mode = Some(mode);
            }
            dumps.push((key, socks, mode, scope));
        }
        if let Some(why) = own_failed {
            let own = self.namespaces.get(&0);
            let mut sh = lock(&self.shared);
            sh.status.sample_errors += errors;
            sh.status.mode = MODE_PROC_FALLBACK.to_owned();
            sh.status.reason = match own.and_then(|n| n.no_netlink.clone()) {
                Some(r) => format!("{r}; {why}"),
                None => why,
            };
            return;
        }
        if let Some((_, own, _, _)) = dumps.iter().find(|d| d.0 == 0 && d.3 == Scope::FULL) {
            self.capacity_hint = own.len() + own.len() / 8;
        }

        // The live sockets whose owners are wanted (`owner_wanted`: connections the flows
        // leave out have none searched): those dumped, and the followed ones of the namespaces
        // not dumped in full (unchanged, or not sampled now: the other namespaces' are kept from
        // their latest sample).
        let filter = self.filter;
        let inodes_of =
            |key: u64, namespaces: &HashMap<u64, Namespace>, live: &mut HashSet<u32>| {
                if let Some((_, socks, _, scope)) = dumps.iter().find(|d| d.0 == key) {
                    live.extend(
                        socks
                            .iter()
                            .filter(|s| owner_wanted(&filter, s))
                            .map(|s| s.inode)
                            .filter(|i| *i != 0),
                    );
                    if *scope == Scope::FULL {
                        return;
                    }
                }
                if let Some(ns) = namespaces.get(&key) {
                    live.extend(ns.tracker.wanted_inodes(&filter).filter(|i| *i != 0));
                }
            };
        if others {
            let mut o = HashSet::new();
            for key in self.namespaces.keys().filter(|k| **k != 0) {
                inodes_of(*key, &self.namespaces, &mut o);
            }
            self.others_live = o;
        }
        let mut live = self.others_live.clone();
        inodes_of(0, &self.namespaces, &mut live);
        // A socket the owner search cannot find may have closed since its dump: asked once,
        // by an exact lookup in its namespace, before every process is listed for it.
        let namespaces = std::cell::RefCell::new(&mut self.namespaces);
        let mut still_open = |ino: u32| -> bool {
            for (key, socks, mode, _) in &dumps {
                if *mode != MODE_NETLINK {
                    continue;
                }
                if let Some(s) = socks.iter().find(|s| s.inode == ino) {
                    return namespaces
                        .borrow_mut()
                        .get_mut(key)
                        .and_then(|n| n.dumper.as_mut())
                        .is_none_or(|d| d.still_open(s));
                }
            }
            true
        };
        // Sockets known open, for a listing of every process (OwnerCache::refresh): this
        // sample's dumps; the sockets followed in a namespace sampled now with nothing dumped
        // (its sockets the same as at its previous sample: an exact rule, see `steady` above);
        // and those of the namespaces not sampled now (a report's sample of the agent's own
        // namespace) as of their latest sample — the same sample their wanted sockets
        // (`others_live`) come from, so a socket closed since is not hiding one of those. A
        // namespace dumped in part adds only what was dumped: its other descriptors are read
        // again, as before.
        let open_sockets = || -> HashSet<u32> {
            let namespaces = namespaces.borrow();
            let mut open: HashSet<u32> = HashSet::new();
            for (key, socks, _, scope) in &dumps {
                open.extend(socks.iter().map(|s| s.inode));
                if !scope.all_tcp
                    && !scope.all_udp
                    && let Some(ns) = namespaces.get(key)
                {
                    open.extend(ns.tracker.inodes());
                }
            }
            if !others {
                for (key, ns) in namespaces.iter() {
                    if *key != 0 {
                        open.extend(ns.tracker.inodes());
                    }
                }
            }
            open.remove(&0);
            open
        };
        self.owners.refresh(
            &live,
            Instant::now(),
            Some(&procs),
            &mut still_open,
            &open_sockets,
        );
        let mut contributions = Vec::new();
        let mut own_mode = MODE_PROC_FALLBACK;
        for (key, socks, mode, scope) in &dumps {
            let Some(ns) = self.namespaces.get_mut(key) else {
                continue;
            };
            if *key == 0 {
                own_mode = mode;
            }
            if *scope != Scope::FULL && socks.is_empty() && !scope.all_udp && !scope.all_tcp {
                continue; // unchanged, nothing moved
            }
            let owners = &self.owners;
            let summary = ns.tracker.observe(
                socks,
                *scope,
                now_unix_ms,
                &|ino| owners.owner(ino),
                &mut contributions,
            );
            if *scope == Scope::FULL {
                ns.sockets = socks.len();
                // Connections left out of the flows have no owner searched: not "unknown".
                let left_out = socks
                    .iter()
                    .filter(|s| !owner_wanted(&filter, s) && (s.inode != 0 || s.cookie != 0))
                    .count();
                ns.unknown_owners = summary.unknown_owners.saturating_sub(left_out);
            }
        }
        // Destroy events after the dumps: a socket freed during a dump may be in it; its event
        // then counts final − dumped counters (the dump was folded in first).
        if let Some(l) = &self.destroy {
            l.flush(flush_keys);
        }
        let mut events = early;
        for (key, evs) in self.take_events() {
            events.entry(key).or_default().extend(evs);
        }
        let destroyed = self.fold_events(events, now_unix_ms, &mut contributions);
        let (short, short_unknown) = self.take_unseen();
        let mut missed = 0;
        for (key, _, mode, _) in &dumps {
            if let Some(ns) = self.namespaces.get_mut(key) {
                let subscribed = *mode == MODE_NETLINK && ns.destroy;
                missed += ns.tracker.finish(now_unix_ms, subscribed);
            }
        }
        losses += self.destroy_losses();
        let (pid_containers, ns_containers) = self.containers_of(&contributions, others);
        let total: usize = self.namespaces.values().map(|n| n.sockets).sum();
        let unknown_owners: usize = self.namespaces.values().map(|n| n.unknown_owners).sum();

        let own = self.namespaces.get(&0);
        let own_netlink = own_mode == MODE_NETLINK;
        let own_reason = own.and_then(|n| {
            if own_netlink {
                n.no_destroy.clone()
            } else {
                n.no_netlink.clone()
            }
        });
        let (own_reasons, other_reasons): (Vec<_>, Vec<_>) =
            reasons.into_iter().partition(|(key, _)| *key == 0);
        let mut reasons: Vec<String> = own_reasons.into_iter().map(|(_, r)| r).collect();
        if others {
            // What the other namespaces said stays until their next sample.
            self.others_reasons = other_reasons.into_iter().map(|(_, r)| r).collect();
            self.others_fallback = fallback;
        }
        reasons.extend(self.others_reasons.iter().cloned());
        let mut sh = lock(&self.shared);
        for c in &contributions {
            sh.table.add(c);
        }
        sh.pid_containers.extend(pid_containers);
        if let Some(by_ns) = ns_containers {
            sh.ns_containers = by_ns;
        }
        let st = &mut sh.status;
        st.mode = own_mode.to_owned();
        reasons.sort();
        reasons.dedup();
        let mut all: Vec<String> = own_reason.into_iter().collect();
        all.extend(reasons);
        if skipped > 0 {
            all.push(format!(
                "{skipped} network namespaces not observed: net.max_namespaces = {} reached",
                self.max_namespaces
            ));
        }
        st.reason = all.join("; ");
        st.sockets = total;
        st.unknown_owners = unknown_owners;
        st.destroyed_seen += destroyed as u64;
        st.destroy_events = own_netlink && own.is_some_and(|n| n.destroy);
        st.sample_errors += errors;
        st.missed_final += missed;
        st.destroy_overruns += losses;
        st.short_connections += short;
        st.short_unknown_owners += short_unknown;
        st.namespaces = self.namespaces.len();
        st.namespaces_fallback = self.others_fallback;
        st.namespaces_skipped = skipped;
    }

    /// The containers of the contributions' owners, and (when `others`: the other namespaces
    /// were sampled) the pod owning each other namespace.
    #[allow(clippy::type_complexity)]
    fn containers_of(
        &self,
        contributions: &[Contribution],
        others: bool,
    ) -> (
        HashMap<u32, pb::ContainerRef>,
        Option<HashMap<u64, pb::ContainerRef>>,
    ) {
        let Some(c) = &self.containers else {
            return (HashMap::new(), Some(HashMap::new()));
        };
        let mut pids: Vec<u32> = contributions.iter().filter_map(|c| c.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        let by_pid = c.of_pids(&pids);
        if !others {
            return (by_pid, None);
        }
        let mut by_ns = HashMap::new();
        for (key, ns) in &self.namespaces {
            if *key == 0 || ns.pids.is_empty() {
                continue;
            }
            let refs = c.of_pids(&ns.pids);
            if let Some(r) = common_owner(ns.pids.iter().map(|p| refs.get(p))) {
                by_ns.insert(*key, r);
            }
        }
        (by_pid, Some(by_ns))
    }

    /// Fold in the destroy events received since the last sample (called between samples by
    /// the sampling thread so that the queue stays short).
    pub fn absorb_destroyed(&mut self, now_unix_ms: i64) {
        let mut contributions = Vec::new();
        let n = self.absorb_into(now_unix_ms, &mut contributions);
        let losses = self.destroy_losses();
        let (short, short_unknown) = self.take_unseen();
        if n == 0 && losses == 0 {
            return;
        }
        let mut sh = lock(&self.shared);
        for c in &contributions {
            sh.table.add(c);
        }
        sh.status.destroyed_seen += n as u64;
        sh.status.destroy_overruns += losses;
        sh.status.short_connections += short;
        sh.status.short_unknown_owners += short_unknown;
    }

    /// Collect the trackers' counts of connections closed unseen; a TCP one turns owner
    /// glances on in its namespace for [`GLANCE_FOR`].
    fn take_unseen(&mut self) -> (u64, u64) {
        let (mut short, mut unknown) = (0, 0);
        let now = Instant::now();
        for ns in self.namespaces.values_mut() {
            let (s, u) = ns.tracker.take_unseen();
            short += s;
            unknown += u;
            if ns.tracker.take_glance_trigger() {
                ns.glance.start(now);
                self.glance_until = Some(now + GLANCE_FOR);
            }
        }
        (short, unknown)
    }

    /// Between two samples, while connections close unseen ([`GLANCE_FOR`]): dump the sockets
    /// of every namespace read over netlink and remember the owner of each connection no
    /// sample has seen yet, so that when it closes before the next sample its destroy event
    /// still gets its process. A connection that opens and closes within one glance period
    /// stays without owner and is counted in `NetStatus::short_unknown_owners`.
    pub fn glance(&mut self, now_unix_ms: i64) {
        let now = Instant::now();
        if !self.enabled || self.glance_until.is_none_or(|t| now >= t) {
            cache::OWNER_GLANCES.entries(0);
            return;
        }
        let mut dumps: Vec<(u64, Vec<ObservedSocket>)> = Vec::new();
        let mut keys: Vec<u64> = self
            .namespaces
            .iter()
            .filter(|(_, ns)| ns.last_mode == Some(MODE_NETLINK) && ns.glance.active(now))
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        cache::OWNER_GLANCES.entries(keys.len());
        // In turn from where the previous glance started, so that a budget spent early does
        // not always leave out the same namespaces.
        if keys.is_empty() {
            return;
        }
        let start = self.glance_turn % keys.len();
        keys.rotate_left(start);
        self.glance_turn = self.glance_turn.wrapping_add(1);
        // The connections that closed unseen so far count against the opens (glance.rs): a
        // glance dumps only for one still open.
        if let Some(l) = &self.destroy {
            l.flush(Some(&keys));
        }
        self.absorb_destroyed(now_unix_ms);
        for key in keys {
            let Some(ns) = self.namespaces.get_mut(&key) else {
                continue;
            };
            let opens = match &ns.files {
                Some(f) => f.snmp(&mut self.net_buf).and_then(glance::parse_opens),
                None => open_net_files(&self.proc_root, key, &ns.pids)
                    .and_then(|f| f.snmp(&mut self.net_buf).and_then(glance::parse_opens)),
            };
            // Only when a connection opened there since its last dump (glance.rs): the dump
            // walks the kernel's whole TCP hash table.
            if !ns.glance.due(opens, now) {
                cache::OWNER_GLANCES.hit();
                continue;
            }
            let Some(d) = ns.dumper.as_mut() else {
                continue;
            };
            // And within the glances' CPU budget (still due at the next glance when skipped).
            if !self.glance_budget.allows(now) {
                cache::OWNER_GLANCE_BUDGET.hit();
                continue;
            }
            cache::OWNER_GLANCE_BUDGET.miss();
            cache::OWNER_GLANCES.miss();
            ns.glance.dumped(opens);
            ns.fresh_glance = true;
            let cpu = glance::thread_cpu();
            let mut socks = Vec::new();
            // Connections only: TCP (UDP's short exchanges are counted by conntrack).
            let dumped = d.dump_where(&mut socks, |_, tcp| tcp);
            self.glance_budget
                .spend(glance::thread_cpu().saturating_sub(cpu));
            if dumped.is_ok() {
                dumps.push((key, socks));
            }
        }
        if dumps.is_empty() {
            return;
        }
        // The events of the sockets that closed before the dumps: not counted against the
        // opens since them.
        if let Some(l) = &self.destroy {
            let dumped: Vec<u64> = dumps.iter().map(|d| d.0).collect();
            l.flush(Some(&dumped));
        }
        self.absorb_destroyed(now_unix_ms);
        let procs = self.table.refresh(TABLE_MAX_AGE);
        // A glance dumps TCP only, and only some namespaces: it looks for the owners of the
        // sockets new to it and forgets no other owner (OwnerCache::glance).
        let filter = self.filter;
        let seen: HashSet<u32> = dumps
            .iter()
            .flat_map(|d| d.1.iter())
            .filter(|s| owner_wanted(&filter, s))
            .map(|s| s.inode)
            .filter(|i| *i != 0)
            .collect();
        // As in a sample: a socket closed since its dump is asked about exactly, not searched
        // for through every process.
        let namespaces = &mut self.namespaces;
        let mut still_open = |ino: u32| -> bool {
            for (key, socks) in &dumps {
                if let Some(s) = socks.iter().find(|s| s.inode == ino) {
                    return namespaces
                        .get_mut(key)
                        .and_then(|n| n.dumper.as_mut())
                        .is_none_or(|d| d.still_open(s));
                }
            }
            true
        };
        // Sockets known open now: the glance's dumps (TCP only; the trackers are not brought
        // up to date by a glance, so what they follow is not taken as open).
        let open_sockets = || -> HashSet<u32> {
            let mut open: HashSet<u32> = dumps
                .iter()
                .flat_map(|d| d.1.iter().map(|s| s.inode))
                .collect();
            open.remove(&0);
            open
        };
        self.owners
            .glance(&seen, now, Some(&procs), &mut still_open, &open_sockets);
        let owners = &self.owners;
        for (key, socks) in &dumps {
            if let Some(ns) = self.namespaces.get_mut(key) {
                ns.tracker
                    .glance(socks, now_unix_ms, &|ino| owners.owner(ino));
            }
        }
        lock(&self.shared).status.glances += 1;
    }

    fn absorb_into(&mut self, now_unix_ms: i64, out: &mut Vec<Contribution>) -> usize {
        let events = self.take_events();
        self.fold_events(events, now_unix_ms, out)
    }

    /// The destroy events received so far, by namespace, counted against the namespaces' marks
    /// ([`flows::TcpCloses`]) but not folded in yet ([`NetCollector::fold_events`]).
    fn take_events(&mut self) -> HashMap<u64, Vec<ObservedSocket>> {
        let mut by_ns: HashMap<u64, Vec<ObservedSocket>> = HashMap::new();
        let Some(l) = &self.destroy else {
            return by_ns;
        };
        let mut events = Vec::new();
        l.drain(&mut events);
        for (key, e) in events.drain(..) {
            by_ns.entry(key).or_default().push(e);
        }
        for (key, evs) in &by_ns {
            if let Some(ns) = self
                .namespaces
                .get_mut(key)
                .filter(|ns| ns.last_mode == Some(MODE_NETLINK))
            {
                let c = ns.tracker.tcp_closes(evs);
                ns.closes.known = ns.closes.known.saturating_add(c.known);
                ns.closes.other = ns.closes.other.saturating_add(c.other);
                if !ns.fresh_sample {
                    ns.closes.unseen = ns.closes.unseen.saturating_add(c.unseen);
                }
                if !ns.fresh_glance {
                    ns.glance.closed_unseen(c.unseen);
                }
            }
        }
        for ns in self.namespaces.values_mut() {
            ns.fresh_sample = false;
            ns.fresh_glance = false;
        }
        by_ns
    }

    /// Fold destroy events in (their final counters into `out`); returns how many.
    fn fold_events(
        &mut self,
        by_ns: HashMap<u64, Vec<ObservedSocket>>,
        now_unix_ms: i64,
        out: &mut Vec<Contribution>,
    ) -> usize {
        let mut n = 0;
        for (key, mut evs) in by_ns {
            if let Some(ns) = self
                .namespaces
                .get_mut(&key)
                .filter(|ns| ns.last_mode == Some(MODE_NETLINK))
            {
                // A closed UDP socket's entry outlives it (for the conntrack UDP timeout, 30 s
                // and more): its final counters are read now, as TCP's come with the event.
                if let Some(ct) = ns.conntrack.as_mut()
                    && let Err(e) = count_udp(ct, &mut evs)
                {
                    tracing::debug!(netns = key, error = %chain(&e), "conntrack dump for closed UDP sockets failed");
                }
                n += ns.tracker.absorb_destroyed(&evs, now_unix_ms, out);
            }
        }
        n
    }

    fn destroy_losses(&mut self) -> u64 {
        let Some(l) = &self.destroy else {
            return 0;
        };
        let s = l.stats();
        let total = s.overruns.load(Ordering::Relaxed) + s.queue_full.load(Ordering::Relaxed);
        let new = total.saturating_sub(self.destroy_losses_seen);
        self.destroy_losses_seen = total;
        if new > 0 {
            // Any namespace's events may be among the lost: every one is dumped again.
            for ns in self.namespaces.values_mut() {
                ns.lost += new;
            }
        }
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

/// Whether the owner of `s` is worth a search: a listener's (the owners count), or a
/// connection's whose remote makes a flow. A connection the flow table leaves out (loopback
/// unless `include_loopback`, link-local unless `include_link_local`) is followed for its bytes
/// like any other but never reported, so its owner is never looked for: on a node of local
/// scrapes and sidecars most new sockets are such.
fn owner_wanted(filter: &Filter, s: &ObservedSocket) -> bool {
    flows::is_listener(s) || !filter.excludes(&flows::normalize(s.remote.ip()))
}

/// Most exact lookups in one namespace's sample ([`NetCollector::sample`]); beyond, its sockets
/// are dumped.
pub const MAX_LOOKUPS: usize = 1024;

/// The sample of a namespace whose TCP sockets are the same as at its previous sample (`then`,
/// its mark then; `now`, its mark now): no TCP request at all when no segment came in since,
/// else exact lookups of its followed TCP sockets that `filter` keeps; its UDP sockets dumped
/// as usual when it has some. `Err(None)`: more than [`MAX_LOOKUPS`] lookups (dump instead).
fn steady_sample(
    d: &mut Dumper,
    tracker: &Tracker,
    filter: &Filter,
    now: sockstat::TcpMark,
    then: sockstat::TcpMark,
    in_use: Option<sockstat::InUse>,
    socks: &mut Vec<ObservedSocket>,
) -> Result<(), Option<diag::DiagError>> {
    if now.in_segs != then.in_segs {
        let keys = tracker.lookup_keys(filter);
        if keys.len() > MAX_LOOKUPS {
            return Err(None);
        }
        // A socket gone meanwhile stays followed until its destroy event.
        let mut gone = Vec::new();
        d.lookup_many(&keys, socks, &mut gone).map_err(Some)?;
    }
    if let Some(u) = in_use
        && u.udp4 + u.udp6 > 0
    {
        d.dump_where(socks, |v6, tcp| !tcp && u.any(v6, false))
            .map_err(Some)?;
    }
    Ok(())
}

/// The one owner of a namespace's processes: their common container when they all share one,
/// else their common pod (its container fields left empty); `None` when they differ, or when
/// some process is not in a container.
fn common_owner<'a>(
    refs: impl Iterator<Item = Option<&'a pb::ContainerRef>>,
) -> Option<pb::ContainerRef> {
    let mut first: Option<pb::ContainerRef> = None;
    for r in refs {
        let r = r?;
        match &mut first {
            None => first = Some(r.clone()),
            Some(f) if f.id == r.id => {}
            Some(f) if !f.pod_uid.is_empty() && f.pod_uid == r.pod_uid => {
                // Several containers of one pod: the pod, not any one container.
                f.id.clear();
                f.name.clear();
                f.image.clear();
                f.image_digest.clear();
                f.container_name.clear();
            }
            Some(_) => return None,
        }
    }
    first
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
    /// sample of every namespace every `cfg.interval_secs` (at least 1), and one of the agent's
    /// own namespace whenever a report asks ([`NetHandle::take_fresh`]); destroy events folded
    /// in every [`ABSORB_PERIOD`] in between, until `stop` is set.
    ///
    /// # Errors
    ///
    /// The operating system's error when it cannot create the thread.
    pub fn spawn(
        cfg: NetConfig,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<(NetHandle, JoinHandle<()>)> {
        Self::spawn_with(NetCollector::new(&cfg), cfg, stop)
    }

    /// [`NetHandle::spawn`] over a collector made by the caller (with its containers).
    ///
    /// # Errors
    ///
    /// The operating system's error when it cannot create the thread.
    pub fn spawn_with(
        mut collector: NetCollector,
        cfg: NetConfig,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<(NetHandle, JoinHandle<()>)> {
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
                // `next`: the next sample of the agent's own namespace (sooner when a report
                // asks); `next_others`: the next sample of every namespace, every interval.
                let mut next = Instant::now();
                let mut next_others = next;
                let advance = |t: &mut Instant, now: Instant| {
                    *t += interval;
                    if *t <= now {
                        *t = now + interval;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    let due = next.min(next_others);
                    if now >= due {
                        if now >= next_others {
                            collector.sample(now_unix_ms());
                            advance(&mut next_others, now);
                        } else {
                            collector.sample_own(now_unix_ms());
                        }
                        samples.fetch_add(1, Ordering::Release);
                        advance(&mut next, now);
                    } else {
                        collector.absorb_destroyed(now_unix_ms());
                        collector.glance(now_unix_ms());
                        let wait = (due - now).min(ABSORB_PERIOD);
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
    /// [`FRESH_SAMPLE_WAIT`]), then [`NetHandle::take`]: a report carries the bytes moved in the
    /// agent's own namespace up to the moment it is built, not up to the last periodic sample
    /// (breach latency is one report interval, not two). The other namespaces are sampled every
    /// `interval_secs` whatever the reports ask ([`NetCollector::sample_own`]).
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
