//! How well the agent's caches of per-process facts work: for each cache, lookups that were
//! answered without reading `/proc` (hits), lookups that had to read (misses), and its size now.
//! Process-wide counters (one agent per process), exported in the agent's `/metrics` as
//! `sov_agent_cache_lookups_total{cache, result}` and `sov_agent_cache_entries{cache}`.
//!
//! Every cache counted here is bounded; its bound is named beside it in the file that owns it.

use std::sync::atomic::{AtomicU64, Ordering};

/// One cache's counters.
#[derive(Debug)]
pub struct CacheCounter {
    /// The `cache` label.
    pub name: &'static str,
    /// What one lookup is, for the metric's help text.
    pub what: &'static str,
    hits: AtomicU64,
    misses: AtomicU64,
    entries: AtomicU64,
}

impl CacheCounter {
    const fn new(name: &'static str, what: &'static str) -> Self {
        Self {
            name,
            what,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            entries: AtomicU64::new(0),
        }
    }

    /// One lookup answered from the cache.
    pub fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` lookups answered from the cache.
    pub fn hits(&self, n: u64) {
        self.hits.fetch_add(n, Ordering::Relaxed);
    }

    /// One lookup that read `/proc` (or the kernel).
    pub fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` lookups that read.
    pub fn misses(&self, n: u64) {
        self.misses.fetch_add(n, Ordering::Relaxed);
    }

    /// The cache holds `n` entries now.
    pub fn entries(&self, n: usize) {
        self.entries
            .store(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// (hits, misses, entries) so far.
    pub fn read(&self) -> (u64, u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            self.entries.load(Ordering::Relaxed),
        )
    }
}

/// The process table: a refresh answered by events (or a recent listing) vs one that listed `/proc`.
pub static PROC_LISTING: CacheCounter = CacheCounter::new(
    "proc_listing",
    "process table refreshes (miss: /proc was listed)",
);
/// CPU and memory of a live process: taken from the previous read vs `/proc/<pid>/stat` read.
pub static PROCESS_STAT: CacheCounter = CacheCounter::new(
    "process_stat",
    "live processes per sample (miss: /proc/N/stat read)",
);
/// Name, executable, command line, user, cgroup and namespaces of a reported process.
pub static PROCESS_DETAIL: CacheCounter = CacheCounter::new(
    "process_detail",
    "reported processes (miss: exe, cmdline, status, cgroup and ns read)",
);
/// A process's network namespace (flows).
pub static NETNS_OF_PID: CacheCounter = CacheCounter::new(
    "process_netns",
    "network namespace of a live process (miss: /proc/N/ns/net read)",
);
/// The owner of a socket inode (flows).
pub static SOCKET_OWNER: CacheCounter = CacheCounter::new(
    "socket_owner",
    "live socket inodes per flow sample (miss: not known, /proc/N/fd walked)",
);
/// A process looked through for the owner of a new socket: skipped (hit) when its number of
/// descriptors is unchanged since its previous walk.
pub static SOCKET_OWNER_WALK: CacheCounter = CacheCounter::new(
    "socket_owner_walk",
    "processes per socket owner search (miss: /proc/N/fd listed; hit: same descriptor count)",
);
/// A namespace's sock_diag dump of one protocol: skipped (hit) when its `sockstat` counts no
/// socket of that protocol.
pub static NAMESPACE_DUMPS: CacheCounter = CacheCounter::new(
    "namespace_dumps",
    "sock_diag dumps per namespace and protocol (hit: skipped, sockstat counts no socket)",
);
/// A namespace's owner glance (flows, between samples): skipped (hit) when no TCP connection
/// opened there since its last dump; entries: namespaces glancing now.
pub static OWNER_GLANCES: CacheCounter = CacheCounter::new(
    "owner_glances",
    "owner glances per namespace (hit: skipped, no TCP connection opened since its last dump; miss: dumped)",
);
/// An owner glance's dump that was due (a connection opened): skipped (hit) when the glances'
/// CPU budget was spent (`net::glance::GLANCE_CPU_PER_SEC`).
pub static OWNER_GLANCE_BUDGET: CacheCounter = CacheCounter::new(
    "owner_glance_budget",
    "owner glance dumps due (hit: skipped, the glances' CPU budget spent; miss: made)",
);
/// The mapped and open files of a process (weights).
pub static PROCESS_FILES: CacheCounter = CacheCounter::new(
    "process_files",
    "processes per weights scan (miss: /proc/N/maps and fd read)",
);

/// A training candidate at a sample (`training::Tracker::sample`): passed over (hit) when its
/// I/O counters, virtual size and descriptor count are unchanged since its descriptors were
/// read (or its periodic re-read waits for a later sample); entries: candidates watched.
pub static TRAINING_SAMPLE: CacheCounter = CacheCounter::new(
    "training_descriptors",
    "training candidates per sample (miss: /proc/N/fd read; hit: passed over, nothing moved)",
);

/// The last listing of an owner search (every process whose descriptor count is unchanged,
/// for the sockets no other step found): put off (hit) for a socket missed for the first time
/// or while its CPU budget is spent (`net::owners::LISTING_CPU_PER_SEC`), made (miss).
pub static OWNER_LISTINGS: CacheCounter = CacheCounter::new(
    "owner_listings",
    "last owner listings due (hit: put off, first miss or budget spent; miss: made)",
);

/// A process that holds weights and nothing else, at a sample (`procs::ProcessCollector::sample`):
/// its description kept out of the report (hit: described already this minute and idle) or put
/// in (miss); entries unused (the process table's entries are `process_stat`'s).
pub static WEIGHT_USER_DESCRIPTIONS: CacheCounter = CacheCounter::new(
    "weight_user_descriptions",
    "processes holding weights only, per sample (hit: described this minute already and idle; miss: described)",
);

/// Every counter, in the order `/metrics` shows them.
pub fn all() -> [&'static CacheCounter; 13] {
    [
        &PROC_LISTING,
        &PROCESS_STAT,
        &PROCESS_DETAIL,
        &NETNS_OF_PID,
        &SOCKET_OWNER,
        &SOCKET_OWNER_WALK,
        &NAMESPACE_DUMPS,
        &OWNER_GLANCES,
        &OWNER_GLANCE_BUDGET,
        &PROCESS_FILES,
        &TRAINING_SAMPLE,
        &OWNER_LISTINGS,
        &WEIGHT_USER_DESCRIPTIONS,
    ]
}
