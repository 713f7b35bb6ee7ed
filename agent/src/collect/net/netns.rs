//! Network namespaces: which ones exist (the distinct `/proc/<pid>/ns/net` of the node's
//! processes, with their pids), and how the agent reaches one it is not in.
//!
//! - [`NsMap`]: pid → namespace inode, read once per new process (one `readlink`), checked again
//!   in turn so that each is read at least every [`RECHECK`] (a process can `unshare` or
//!   `setns`), forgotten when the process leaves the shared process table;
//! - [`open_in`]: the netlink sockets of another namespace. `setns(CLONE_NEWNET)` moves only the
//!   calling thread, so it is done on a short-lived OS thread of its own (never a runtime worker,
//!   never the sampling thread): it enters the namespace, opens the dump socket and the
//!   destroy-event socket, and ends. A netlink socket stays bound to the namespace it was opened
//!   in for its whole life, so the sampling thread then uses both from the agent's namespace.
//!   Entering needs `CAP_SYS_ADMIN`; without it the namespace is read from
//!   `/proc/<pid>/net/{tcp,tcp6,udp,udp6}` (no byte counters), and the reason is reported.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use netlink_sys::Socket;

use super::conntrack::{Conntrack, ConntrackError};
use super::diag::{DiagError, Dumper};
use crate::collect::cache;
use crate::collect::namespaces;
use crate::collect::proctable::Gen;

/// How often every known pid's namespace is read again.
pub const RECHECK: Duration = Duration::from_secs(60);

/// Why another namespace's sockets could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `/proc/<pid>/ns/net` could not be opened.
    #[error("cannot open /proc/{pid}/ns/net")]
    Open {
        /// The process.
        pid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The pid moved to another namespace (or was reused) meanwhile.
    #[error("/proc/{pid}/ns/net is no longer namespace {inode}")]
    Moved {
        /// The process.
        pid: u32,
        /// The namespace wanted.
        inode: u64,
    },
    /// `setns` was refused (no `CAP_SYS_ADMIN`, or a seccomp/LSM rule).
    #[error("setns into network namespace {inode} refused")]
    Enter {
        /// The namespace.
        inode: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The dump socket could not be opened inside.
    #[error("no sock_diag socket inside network namespace {inode}")]
    Diag {
        /// The namespace.
        inode: u64,
        /// The cause.
        #[source]
        source: DiagError,
    },
    /// The helper thread could not be created or panicked.
    #[error("namespace helper thread failed: {0}")]
    Thread(String),
}

/// The sockets opened inside one namespace.
#[derive(Debug)]
pub struct NsSockets {
    /// For dumps.
    pub dumper: Dumper,
    /// For destroy events, or why there is none.
    pub destroy: Result<Socket, DiagError>,
    /// For connection tracking dumps (UDP bytes), or why there is none.
    pub conntrack: Result<Conntrack, ConntrackError>,
    /// When asked to switch accounting on: whether that worked.
    pub accounting: Option<io::Result<()>>,
}

/// Open the dump, destroy-event and conntrack sockets inside network namespace `inode`,
/// reached through `<proc_root>/<pid>/ns/net`, on a thread of its own; with
/// `enable_accounting`, also set `nf_conntrack_acct = 1` there (`[net] conntrack_accounting`).
pub fn open_in(
    proc_root: &Path,
    pid: u32,
    inode: u64,
    enable_accounting: bool,
) -> Result<NsSockets, NetnsError> {
    let link = proc_root.join(pid.to_string()).join("ns").join("net");
    let file = File::open(&link).map_err(|source| NetnsError::Open { pid, source })?;
    let meta = file
        .metadata()
        .map_err(|source| NetnsError::Open { pid, source })?;
    if meta.ino() != inode {
        return Err(NetnsError::Moved { pid, inode });
    }
    std::thread::scope(|s| {
        let helper = std::thread::Builder::new()
            .name("sov-netns".into())
            .spawn_scoped(s, || {
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|e| NetnsError::Enter {
                    inode,
                    source: e.into(),
                })?;
                let dumper = Dumper::open().map_err(|source| NetnsError::Diag { inode, source })?;
                let destroy = super::destroy::open_socket();
                let conntrack = Conntrack::open();
                let accounting = enable_accounting.then(super::conntrack::enable_accounting);
                // The thread ends here; only the sockets stay in the namespace.
                Ok(NsSockets {
                    dumper,
                    destroy,
                    conntrack,
                    accounting,
                })
            })
            .map_err(|e| NetnsError::Thread(e.to_string()))?;
        helper
            .join()
            .map_err(|_| NetnsError::Thread("panicked".to_owned()))?
    })
}

/// pid → network namespace inode, for every process.
#[derive(Debug, Default)]
pub struct NsMap {
    /// By pid: the process's generation in the table when read, and its namespace.
    pids: HashMap<u32, (Gen, u64)>,
    /// Where the turn of re-reads stopped.
    cursor: u32,
    checked: Option<Instant>,
    /// `readlink` calls so far (for benchmarks).
    pub links_read: u64,
}

impl NsMap {
    /// Bring the map up to date with the live processes: new ones (and ones born again or
    /// that executed) are read, gone ones dropped, and the others read again in turn so that
    /// each is read at least every [`RECHECK`] (a process can `unshare` or `setns`).
    pub fn refresh(&mut self, proc_root: &Path, live: &HashMap<u32, Gen>, now: Instant) {
        if live.is_empty() {
            return;
        }
        let elapsed = self
            .checked
            .map_or(RECHECK, |t| now.saturating_duration_since(t));
        self.checked = Some(now);
        self.pids.retain(|pid, (g, _)| live.get(pid) == Some(g));
        let mut read: Vec<u32> = live
            .keys()
            .copied()
            .filter(|pid| !self.pids.contains_key(pid))
            .collect();
        let known = self.pids.len();
        let share = (elapsed.as_secs_f64() / RECHECK.as_secs_f64()).min(1.0);
        let quota = ((known as f64 * share).ceil() as usize).min(known);
        if quota > 0 {
            let mut keys: Vec<u32> = self.pids.keys().copied().collect();
            keys.sort_unstable();
            let at = keys.partition_point(|p| *p <= self.cursor);
            let turn: Vec<u32> = keys[at..]
                .iter()
                .chain(&keys[..at])
                .copied()
                .take(quota)
                .collect();
            if let Some(&last) = turn.last() {
                self.cursor = last;
            }
            read.extend(turn);
        }
        cache::NETNS_OF_PID.misses(read.len() as u64);
        cache::NETNS_OF_PID.hits(live.len().saturating_sub(read.len()) as u64);
        for pid in read {
            self.links_read += 1;
            match (
                live.get(&pid),
                namespaces::of_pid(proc_root, pid, namespaces::NET),
            ) {
                (Some(g), Some(ino)) => {
                    self.pids.insert(pid, (*g, ino));
                }
                _ => {
                    self.pids.remove(&pid);
                }
            }
        }
        cache::NETNS_OF_PID.entries(self.pids.len());
    }

    /// Every namespace with its pids (sorted).
    pub fn namespaces(&self) -> HashMap<u64, Vec<u32>> {
        let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
        for (&pid, &(_, ns)) in &self.pids {
            out.entry(ns).or_default().push(pid);
        }
        for v in out.values_mut() {
            v.sort_unstable();
        }
        out
    }

    /// The namespace of `pid`, when known.
    pub fn of(&self, pid: u32) -> Option<u64> {
        self.pids.get(&pid).map(|(_, ns)| *ns)
    }
}
