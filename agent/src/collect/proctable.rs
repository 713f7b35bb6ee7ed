//! The node's live processes, shared by every collector: which pids exist, and a generation per
//! pid that changes when the pid is born again (reused) or executes a new program, so that each
//! collector can keep what it read about a process until the process changes.
//!
//! Two ways to know, chosen once at start:
//! - **events** (root in the host's namespaces): the kernel's process connector
//!   (`NETLINK_CONNECTOR`, `CN_IDX_PROC`) announces every fork, exec and exit; [`ProcTable::refresh`]
//!   drains what came since the previous call (non-blocking), so a steady node costs no
//!   `/proc` listing at all. A full receive buffer (`ENOBUFS`: events were lost) makes the next
//!   refresh list `/proc` once and start over; so does every [`RESYNC`].
//! - **listing** (no `CAP_NET_ADMIN`, another network or pid namespace, a `/proc` mounted
//!   elsewhere, or the kernel refused): `/proc` is listed, at most once per `max_age` given to
//!   [`ProcTable::refresh`], so the collectors of one cycle share one listing. A pid reused
//!   between two listings, or an exec, is then not seen here: collectors also compare the
//!   process's start time (and name) to tell.
//!
//! Measured on the 2-core development VM with 3,100 processes (see docs/PERFORMANCE.md): one
//! listing of `/proc` costs about 3 ms of CPU, one read of every `/proc/<pid>/stat` about 28 ms;
//! draining the events of a quiet node costs a few microseconds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_CONNECTOR};

use crate::collect::cache;

/// In event mode, `/proc` is still listed this often, in case an event was lost unnoticed.
pub const RESYNC: Duration = Duration::from_secs(300);
/// Receive buffer asked for the events (the kernel caps it at `net.core.rmem_max`).
pub const EVENT_RCVBUF: usize = 4 * 1024 * 1024;
/// How long the start waits for the kernel's answer to the subscription.
const SUBSCRIBE_WAIT: Duration = Duration::from_millis(200);

/// `CN_IDX_PROC` / `CN_VAL_PROC` (`linux/connector.h`).
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
/// `PROC_CN_MCAST_LISTEN` (`linux/cn_proc.h`).
const PROC_CN_MCAST_LISTEN: u32 = 1;
/// `enum what` of `struct proc_event`.
const PROC_EVENT_NONE: u32 = 0;
const PROC_EVENT_FORK: u32 = 1;
const PROC_EVENT_EXEC: u32 = 2;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// `NLMSG_DONE`: the type the connector's messages carry.
const NLMSG_DONE: u16 = 3;
/// Offsets in one datagram: netlink header (16), `cn_msg` (20), then `proc_event`, whose data
/// starts after `what`, `cpu` and the 8-aligned `timestamp_ns` (16).
const EVENT_AT: usize = 16 + 20;
const DATA_AT: usize = EVENT_AT + 16;
const ENOBUFS: i32 = 105;

/// What the table knows of one live process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gen {
    /// Changes when the pid is seen born (fork, or first listed): a reused pid gets a new one.
    pub born: u64,
    /// Changes at each exec seen (0 until one is; always 0 in listing mode).
    pub exec: u64,
}

/// How the table learns about processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The process connector.
    Events,
    /// Listing `/proc`, and why events are not used.
    Listing(String),
}

#[derive(Debug)]
struct Inner {
    proc_root: PathBuf,
    events: Option<Socket>,
    mode: Mode,
    live: Arc<HashMap<u32, Gen>>,
    next: u64,
    listed_at: Option<Instant>,
    /// Events were lost: list at the next refresh.
    resync: bool,
    listings: u64,
    events_seen: u64,
    overruns: u64,
    buf: Vec<u8>,
}

/// The shared table (cheap to clone; every clone sees the same processes).
#[derive(Debug, Clone)]
pub struct ProcTable {
    inner: Arc<Mutex<Inner>>,
}

/// Counters of the table, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// `/proc` listings done.
    pub listings: u64,
    /// Connector events handled.
    pub events: u64,
    /// `ENOBUFS` reports (events lost, a listing followed).
    pub overruns: u64,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ProcTable {
    /// A table over `proc_root`: events when `proc_root` is this pid namespace's `/proc` and
    /// the kernel accepts the subscription, else listing.
    pub fn new(proc_root: &Path) -> Self {
        let (events, mode) = if proc_root != Path::new("/proc") {
            (
                None,
                Mode::Listing(format!("{} is not /proc", proc_root.display())),
            )
        } else {
            match subscribe() {
                Ok(s) => (Some(s), Mode::Events),
                Err(why) => (None, Mode::Listing(why)),
            }
        };
        if let Mode::Listing(why) = &mode {
            tracing::debug!(reason = %why, "process table lists /proc (no process events)");
        }
        Self::build(proc_root, events, mode)
    }

    /// A table that always lists `proc_root` (tests; tools that run once).
    pub fn listing(proc_root: &Path) -> Self {
        Self::build(proc_root, None, Mode::Listing("asked for".to_owned()))
    }

    fn build(proc_root: &Path, events: Option<Socket>, mode: Mode) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                proc_root: proc_root.to_path_buf(),
                events,
                mode,
                live: Arc::new(HashMap::new()),
                next: 0,
                listed_at: None,
                resync: true,
                listings: 0,
                events_seen: 0,
                overruns: 0,
                buf: vec![0; 64 * 1024],
            })),
        }
    }

    /// How processes are learnt.
    pub fn mode(&self) -> Mode {
        lock(&self.inner).mode.clone()
    }

    /// The table's counters so far.
    pub fn stats(&self) -> TableStats {
        let i = lock(&self.inner);
        TableStats {
            listings: i.listings,
            events: i.events_seen,
            overruns: i.overruns,
        }
    }

    /// Bring the table up to date and return the live processes. Events mode: drain the
    /// pending events (list `/proc` after a loss, or every [`RESYNC`]). Listing mode: list
    /// `/proc` unless the previous listing is younger than `max_age`.
    pub fn refresh(&self, max_age: Duration) -> Arc<HashMap<u32, Gen>> {
        let mut i = lock(&self.inner);
        let now = Instant::now();
        if i.events.is_some() {
            i.drain();
        }
        let stale = i.listed_at.is_none_or(|t| {
            let age = now.duration_since(t);
            if i.events.is_some() {
                age >= RESYNC
            } else {
                age >= max_age
            }
        });
        if i.resync || stale {
            i.list(now);
        } else {
            cache::PROC_LISTING.hit();
        }
        i.live.clone()
    }

    /// The live processes as of the latest refresh.
    pub fn live(&self) -> Arc<HashMap<u32, Gen>> {
        lock(&self.inner).live.clone()
    }
}

impl Inner {
    fn list(&mut self, now: Instant) {
        cache::PROC_LISTING.miss();
        let Ok(dir) = std::fs::read_dir(&self.proc_root) else {
            tracing::warn!(root = %self.proc_root.display(), "cannot list processes");
            return;
        };
        // Drain first so that an exit announced before the listing cannot remove a pid the
        // listing saw alive afterwards.
        let mut next = self.next;
        let old = self.live.clone();
        let mut live = HashMap::with_capacity(old.len() + 16);
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let g = old.get(&pid).copied().unwrap_or_else(|| {
                next += 1;
                Gen {
                    born: next,
                    exec: 0,
                }
            });
            live.insert(pid, g);
        }
        self.next = next;
        self.live = Arc::new(live);
        self.listed_at = Some(now);
        self.resync = false;
        self.listings += 1;
        cache::PROC_LISTING.entries(self.live.len());
    }

    fn drain(&mut self) {
        let Some(sock) = self.events.as_ref() else {
            return;
        };
        let mut changes: Vec<(u32, u32)> = Vec::new();
        loop {
            let n = match sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(ENOBUFS) => {
                    self.overruns += 1;
                    self.resync = true;
                    continue;
                }
                Err(_) => break, // EAGAIN: nothing more now
            };
            if let Some(ev) = parse_event(&self.buf[..n.min(self.buf.len())]) {
                changes.push(ev);
            }
        }
        if changes.is_empty() {
            return;
        }
        self.events_seen += changes.len() as u64;
        let live = Arc::make_mut(&mut self.live);
        for (what, pid) in changes {
            match what {
                PROC_EVENT_FORK => {
                    self.next += 1;
                    live.insert(
                        pid,
                        Gen {
                            born: self.next,
                            exec: 0,
                        },
                    );
                }
                PROC_EVENT_EXEC => {
                    self.next += 1;
                    let g = live.entry(pid).or_insert(Gen {
                        born: self.next,
                        exec: 0,
                    });
                    g.exec = self.next;
                }
                PROC_EVENT_EXIT => {
                    live.remove(&pid);
                }
                _ => {}
            }
        }
        cache::PROC_LISTING.entries(self.live.len());
    }
}

/// `(what, process id)` of one connector datagram, for the events that concern a process (a
/// thread group), not one of its threads; `None` for anything else.
fn parse_event(d: &[u8]) -> Option<(u32, u32)> {
    let u32_at = |at: usize| -> Option<u32> {
        d.get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let kind = d.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]))?;
    if kind != NLMSG_DONE || u32_at(16)? != CN_IDX_PROC {
        return None;
    }
    let what = u32_at(EVENT_AT)?;
    match what {
        // child_pid, child_tgid after parent_pid, parent_tgid.
        PROC_EVENT_FORK => {
            let (pid, tgid) = (u32_at(DATA_AT + 8)?, u32_at(DATA_AT + 12)?);
            (pid == tgid).then_some((what, tgid))
        }
        PROC_EVENT_EXEC | PROC_EVENT_EXIT => {
            let (pid, tgid) = (u32_at(DATA_AT)?, u32_at(DATA_AT + 4)?);
            (pid == tgid).then_some((what, tgid))
        }
        _ => None,
    }
}

/// Open the connector socket, join the process events' group, ask for them and wait for the
/// kernel's acknowledgement (it only answers in the initial network namespace, and refuses
/// without `CAP_NET_ADMIN`).
fn subscribe() -> Result<Socket, String> {
    if !in_initial_pid_namespace() {
        return Err("the agent is not in the initial pid namespace".to_owned());
    }
    let mut s = Socket::new(NETLINK_CONNECTOR).map_err(|e| format!("no connector socket: {e}"))?;
    s.bind(&SocketAddr::new(0, CN_IDX_PROC))
        .map_err(|e| format!("cannot join the process events: {e}"))?;
    if let Err(e) = s.set_rx_buf_sz(EVENT_RCVBUF) {
        tracing::debug!(error = %e, "cannot enlarge the process events' receive buffer");
    }
    let mut msg = Vec::with_capacity(40);
    msg.extend_from_slice(&40u32.to_ne_bytes());
    msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
    msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&std::process::id().to_ne_bytes());
    msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
    msg.extend_from_slice(&4u16.to_ne_bytes()); // len
    msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
    msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    s.send(&msg, 0)
        .map_err(|e| format!("cannot ask for process events: {e}"))?;
    // The acknowledgement is a PROC_EVENT_NONE carrying an error number.
    let deadline = Instant::now() + SUBSCRIBE_WAIT;
    let mut buf = vec![0u8; 4096];
    s.set_non_blocking(true)
        .map_err(|e| format!("connector socket: {e}"))?;
    while Instant::now() < deadline {
        match s.recv(&mut &mut buf[..], 0) {
            Ok(n) => {
                let d = &buf[..n.min(buf.len())];
                let what = d
                    .get(EVENT_AT..EVENT_AT + 4)
                    .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                if what == Some(PROC_EVENT_NONE) {
                    let err = d
                        .get(DATA_AT..DATA_AT + 4)
                        .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    return if err == 0 {
                        Ok(s)
                    } else {
                        Err(format!("the kernel refused process events (errno {err})"))
                    };
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    Err(
        "no answer to the process events subscription (not the initial network namespace?)"
            .to_owned(),
    )
}

/// True when `/proc/self/status` names one pid (`NSpid` has a single column).
fn in_initial_pid_namespace() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .map(|v| v.split_whitespace().count() == 1)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Refresh until `cond` holds on the live set (events arrive asynchronously), at most 5 s.
    fn until(t: &ProcTable, cond: impl Fn(&HashMap<u32, Gen>) -> bool) -> Arc<HashMap<u32, Gen>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let live = t.refresh(Duration::ZERO);
            if cond(&live) || Instant::now() > deadline {
                return live;
            }
            std::thread::yield_now();
        }
    }

    fn check_births_execs_and_exits(t: &ProcTable) {
        let me = std::process::id();
        assert!(t.refresh(Duration::ZERO).contains_key(&me));
        // A shell that forks a child, then execs sleep (same pid, new program).
        let mut child = Command::new("sh")
            .args(["-c", "read x; exec sleep 30"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("sh");
        let pid = child.id();
        let live = until(t, |l| l.contains_key(&pid));
        let born = live.get(&pid).copied().expect("a new process is seen");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(b"go\n").expect("write");
        }
        // Wait for the exec to happen (its comm changes).
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() != "sleep")
            && Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        if t.mode() == Mode::Events {
            let live = until(t, |l| l.get(&pid).is_some_and(|g| g.exec != born.exec));
            let g = live.get(&pid).copied().expect("still alive");
            assert_eq!(g.born, born.born, "same process");
            assert_ne!(g.exec, born.exec, "the exec is seen");
        }
        child.kill().expect("kill");
        child.wait().expect("reap");
        let live = until(t, |l| !l.contains_key(&pid));
        assert!(
            !live.contains_key(&pid),
            "an exited process leaves the table"
        );
    }

    #[test]
    fn the_table_sees_a_process_born_exec_and_exit_with_events_where_allowed() {
        let t = ProcTable::new(Path::new("/proc"));
        println!("process table mode: {:?}", t.mode());
        check_births_execs_and_exits(&t);
        if t.mode() == Mode::Events {
            let s = t.stats();
            assert!(s.events > 0, "{s:?}");
            assert_eq!(
                s.listings, 1,
                "events mode lists /proc once, at start: {s:?}"
            );
        }
    }

    #[test]
    fn the_table_sees_a_process_born_and_exit_by_listing() {
        let t = ProcTable::listing(Path::new("/proc"));
        check_births_execs_and_exits(&t);
        assert!(t.stats().listings > 1);
    }

    #[test]
    fn a_listing_is_shared_within_max_age() {
        let root = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(root.path().join("12")).expect("mkdir");
        std::fs::create_dir(root.path().join("self")).expect("mkdir");
        let t = ProcTable::new(root.path());
        assert!(matches!(t.mode(), Mode::Listing(_)));
        let live = t.refresh(Duration::from_secs(60));
        assert_eq!(live.keys().copied().collect::<Vec<_>>(), [12]);
        std::fs::create_dir(root.path().join("13")).expect("mkdir");
        assert_eq!(t.refresh(Duration::from_secs(60)).len(), 1, "shared");
        let live = t.refresh(Duration::ZERO);
        assert_eq!(live.len(), 2);
        assert_eq!(
            live[&12],
            Gen { born: 1, exec: 0 },
            "a known pid keeps its generation"
        );
        assert_eq!(t.stats().listings, 2);
    }

    #[test]
    fn only_whole_processes_count_not_threads() {
        let mut d = vec![0u8; DATA_AT + 24];
        d[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        d[16..20].copy_from_slice(&CN_IDX_PROC.to_ne_bytes());
        d[EVENT_AT..EVENT_AT + 4].copy_from_slice(&PROC_EVENT_FORK.to_ne_bytes());
        let put = |d: &mut Vec<u8>, at: usize, v: u32| {
            d[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        };
        put(&mut d, DATA_AT + 8, 500);
        put(&mut d, DATA_AT + 12, 500);
        assert_eq!(parse_event(&d), Some((PROC_EVENT_FORK, 500)));
        put(&mut d, DATA_AT + 8, 501); // a thread of 500
        assert_eq!(parse_event(&d), None);
        put(&mut d, EVENT_AT, PROC_EVENT_EXIT);
        put(&mut d, DATA_AT, 500);
        put(&mut d, DATA_AT + 4, 500);
        assert_eq!(parse_event(&d), Some((PROC_EVENT_EXIT, 500)));
        assert_eq!(parse_event(&d[..20]), None, "short datagrams are ignored");
    }
}
