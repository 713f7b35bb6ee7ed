//! Network namespaces: which ones exist (the distinct `/proc/<pid>/ns/net` of the node's
//! processes, with their pids), and how the agent reaches one it is not in.
//!
//! - [`NsMap`]: pid → namespace inode, read once per new pid (one `readlink`), checked again
//!   every [`RECHECK`] (a process can `unshare` or `setns`), forgotten with the pid;
//! - [`open_in`]: the netlink sockets of another namespace. `setns(CLONE_NEWNET)` moves only the
//!   calling thread, so it is done on a short-lived OS thread of its own (never a runtime worker,
//!   never the sampling thread): it enters the namespace, opens the dump socket and the
//!   destroy-event socket, and ends. A netlink socket stays bound to the namespace it was opened
//!   in for its whole life, so the sampling thread then uses both from the agent's namespace.
//!   Entering needs `CAP_SYS_ADMIN`; without it the namespace is read from
//!   `/proc/<pid>/net/{tcp,tcp6,udp,udp6}` (no byte counters), and the reason is reported.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use netlink_sys::Socket;

use super::conntrack::{Conntrack, ConntrackError};
use super::diag::{DiagError, Dumper};
use crate::collect::namespaces;

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
    pids: HashMap<u32, u64>,
    checked: Option<Instant>,
    /// `readlink` calls so far (for benchmarks).
    pub links_read: u64,
}

impl NsMap {
    /// Bring the map up to date with `<proc_root>`'s processes: new pids are read, gone ones
    /// dropped, and every pid read again once per [`RECHECK`].
    pub fn refresh(&mut self, proc_root: &Path, now: Instant) {
        let listed = namespaces::pids(proc_root);
        if listed.is_empty() {
            return;
        }
        let recheck = self
            .checked
            .is_none_or(|t| now.duration_since(t) >= RECHECK);
        if recheck {
            self.checked = Some(now);
        }
        let mut live = HashSet::with_capacity(listed.len());
        for pid in listed {
            live.insert(pid);
            if recheck || !self.pids.contains_key(&pid) {
                self.links_read += 1;
                match namespaces::of_pid(proc_root, pid, namespaces::NET) {
                    Some(ino) => {
                        self.pids.insert(pid, ino);
                    }
                    None => {
                        self.pids.remove(&pid);
                    }
                }
            }
        }
        self.pids.retain(|pid, _| live.contains(pid));
    }

    /// Every namespace with its pids (sorted).
    pub fn namespaces(&self) -> HashMap<u64, Vec<u32>> {
        let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
        for (&pid, &ns) in &self.pids {
            out.entry(ns).or_default().push(pid);
        }
        for v in out.values_mut() {
            v.sort_unstable();
        }
        out
    }

    /// The namespace of `pid`, when known.
    pub fn of(&self, pid: u32) -> Option<u64> {
        self.pids.get(&pid).copied()
    }
}
