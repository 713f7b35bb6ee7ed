//! Processes: pid, parent, name, executable, command line, user, start time, cgroup and container
//! id, namespaces, CPU share over the interval and resident memory, for the top N by CPU, the top
//! N by RSS and every process another collector marks as interesting (GPU users, weight holders,
//! flow owners).
//!
//! Read straight from `/proc`, so that a sample's cost follows what changed on the node rather
//! than how many processes exist:
//! - which processes exist comes from the shared [`ProcTable`] (the kernel's process events, no
//!   listing at all on a steady node; else one listing of `/proc`);
//! - `/proc/<pid>/stat` (CPU ticks, RSS, start time) is read every sample only for processes that
//!   are new, used CPU at their previous read ("busy"), are among the top N by memory, or are
//!   interesting (a process interesting only for the weights it holds: once a minute, see
//!   [`ProcessCollector::sample_at`]); an idle process is read again in turn, each one at least every
//!   `[processes] idle_recheck_secs` (the reads spread evenly over the samples). Ticks are
//!   cumulative, so nothing is lost: an idle process that wakes up has all its ticks counted at
//!   its next read, its share averaged over the time since its previous read, and it is busy (read
//!   every sample) from then on;
//! - the details of a reported process (`exe`, `cmdline`, `status` for the uid, `cgroup`, its
//!   network and mount namespaces) are read once and kept while the process is the same one:
//!   same pid and start time, no exec seen (process events) and the same name (`comm`, which
//!   an exec changes), and read again at most [`DETAIL_MAX_AGE`] later.
//!
//! Bounded: one entry per live process, dropped when the process leaves the table.
//!
//! Fixed assumptions, so that no libc call is needed: CPU ticks are counted at [`USER_HZ`] (100 per
//! second, the Linux user-space ABI on every mainstream architecture); the page size is the first
//! `KernelPageSize` in `/proc/self/smaps`, else [`DEFAULT_PAGE_SIZE`]; user names come from
//! `/etc/passwd` only (users known only to LDAP/SSSD show as their numeric uid).
//!
//! Cost (docs/PERFORMANCE.md §3): reading one `/proc/<pid>/stat` costs about 9 µs of CPU on the
//! 2-core development VM, so reading all of 3,100 processes every sample would cost about 28 ms,
//! three times node_exporter's whole scrape.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sov_proto::pb::{self, ProcessReason};

use crate::collect::cache;
use crate::collect::namespaces;
use crate::collect::proctable::{Gen, ProcTable};

/// Where the kernel's process table is mounted.
pub const DEFAULT_PROC_ROOT: &str = "/proc";
/// Where user names are read from.
pub const DEFAULT_PASSWD_PATH: &str = "/etc/passwd";
/// Clock ticks per second in `/proc/<pid>/stat` (the kernel's `USER_HZ`, fixed at 100 by the ABI).
pub const USER_HZ: u64 = 100;
/// Page size used when `/proc/self/smaps` does not tell.
pub const DEFAULT_PAGE_SIZE: u64 = 4096;
/// How long the uid → name table is trusted before `/etc/passwd` is read again.
pub const PASSWD_REFRESH: Duration = Duration::from_secs(300);
/// At most this many command-line arguments are reported.
pub const MAX_CMDLINE_ARGS: usize = 32;
/// At most this many bytes of command-line text (all arguments together) are reported.
pub const MAX_CMDLINE_BYTES: usize = 4096;
/// Default of `[processes] idle_recheck_secs`.
pub const DEFAULT_IDLE_RECHECK: Duration = Duration::from_secs(60);
/// A reported process's details (user, cgroup, …) are read again at least this often, even
/// when nothing says they changed (a process can change its uid or cgroup without exec).
pub const DETAIL_MAX_AGE: Duration = Duration::from_secs(60);

/// Below this interval between samples, the weight holders' descriptions of a minute are
/// spread over its first seconds by pid ([`weights_due`]); from it on, each is described at the
/// first sample of every minute.
const WEIGHTS_SPREAD_BELOW: Duration = Duration::from_secs(20);

/// `ESRCH`: what reading a file of a process that just exited may return instead of `ENOENT`.
const ESRCH: i32 = 3;
/// Runtime prefixes of a systemd scope (or cgroupfs directory) named after a container id.
/// The `*-conmon-*` monitors are deliberately absent: they run beside the container, not in it.
const CONTAINER_SCOPE_PREFIXES: [&str; 4] = ["docker-", "cri-containerd-", "crio-", "libpod-"];
/// Length of a full container id (hex SHA-256).
const CONTAINER_ID_LEN: usize = 64;

/// One sample of the process table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessSample {
    /// The selected processes, ordered by pid, each with its reasons (sorted, no duplicates).
    pub processes: Vec<pb::ProcessInfo>,
    /// Live processes known after the sample (their `stat` was read at least once).
    pub total: usize,
    /// Processes listed whose `stat` could not be read or parsed this sample, not counting
    /// those that exited during the sample.
    pub stat_errors: usize,
}

/// What the collector read so far (for tests and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// `/proc/<pid>/stat` reads.
    pub stat_reads: u64,
    /// Live processes whose previous read was used instead.
    pub stat_kept: u64,
    /// Details read (exe, cmdline, status, cgroup, namespaces).
    pub detail_reads: u64,
    /// Details reused from an earlier read.
    pub detail_kept: u64,
}

/// Samples processes from `/proc`. Keep one per agent: the CPU share is the difference between
/// two reads, so the first sample reports 0 % for every process and no top-CPU processes.
#[derive(Debug)]
pub struct ProcessCollector {
    proc_root: PathBuf,
    users: UserNames,
    page_size: u64,
    /// Boot time in unix milliseconds (`btime` of `/proc/stat`); `None` when unknown.
    boot_time_ms: Option<i64>,
    table: ProcTable,
    idle_recheck: Duration,
    /// Every live process read at least once, by pid.
    known: BTreeMap<u32, Known>,
    /// Where the turn of idle processes stopped.
    cursor: u32,
    prev_at: Option<Instant>,
    /// Ticks since boot when the previous sample began (`/proc/uptime`).
    prev_uptime_ticks: Option<u64>,
    stats: ReadStats,
    /// Reused read buffer for `stat` files.
    buf: Vec<u8>,
    /// At most this many processes keep their `stat` open (a sixteenth of the descriptor
    /// limit).
    held_max: usize,
    /// How many do now.
    held: usize,
}

/// One live process as last read.
#[derive(Debug)]
struct Known {
    generation: Gen,
    /// Its `/proc/<pid>/stat`, kept open while it is read at every sample (busy or wanted):
    /// read again by `pread`, no path walk, no open and close. It refers to that very process:
    /// once it has exited the read fails.
    file: Option<fs::File>,
    stat: Stat,
    read_at: Instant,
    /// Used CPU between its last two reads, or was read only once: read every sample.
    busy: bool,
    /// Its details, the generation and name they were read under, and when (boxed: most
    /// processes have none, and an entry per live process stays small).
    detail: Option<Box<(pb::ProcessInfo, Gen, Instant)>>,
    /// The wall-clock minute (unix milliseconds / 60,000) of its latest description in a
    /// sample; `None` before the first.
    described: Option<i64>,
}

/// What pass 1 learns from `/proc/<pid>/stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stat {
    name: String,
    ppid: u32,
    /// utime + stime, in ticks.
    ticks: u64,
    /// Start time in ticks after boot.
    starttime: u64,
    rss_pages: u64,
}

/// A process read this sample: its ticks since its previous read, over how long.
#[derive(Debug, Clone, Copy)]
struct Fresh {
    ticks: u64,
    secs: f64,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessCollector {
    /// A collector over `/proc` and `/etc/passwd`, with a process table of its own.
    pub fn new() -> Self {
        Self::with_table(ProcTable::new(Path::new(DEFAULT_PROC_ROOT)))
    }

    /// A collector over `/proc` sharing `table` with the agent's other collectors.
    pub fn with_table(table: ProcTable) -> Self {
        let mut c = Self::with_paths(DEFAULT_PROC_ROOT, DEFAULT_PASSWD_PATH);
        c.table = table;
        c
    }

    /// A collector over another process table and user list, e.g. the host's `/proc` and
    /// `/etc/passwd` mounted into the agent's container.
    pub fn with_paths(proc_root: impl Into<PathBuf>, passwd: impl Into<PathBuf>) -> Self {
        let proc_root = proc_root.into();
        let page_size = read_page_size(&proc_root.join("self/smaps")).unwrap_or(DEFAULT_PAGE_SIZE);
        let boot_time_ms = read_boot_time_ms(&proc_root.join("stat"));
        let table = if proc_root == Path::new(DEFAULT_PROC_ROOT) {
            ProcTable::new(&proc_root)
        } else {
            ProcTable::listing(&proc_root)
        };
        Self {
            table,
            proc_root,
            users: UserNames::new(passwd.into()),
            page_size,
            boot_time_ms,
            idle_recheck: DEFAULT_IDLE_RECHECK,
            known: BTreeMap::new(),
            cursor: 0,
            prev_at: None,
            prev_uptime_ticks: None,
            stats: ReadStats::default(),
            buf: Vec::with_capacity(512),
            held_max: crate::collect::descriptor_limit()
                .map_or(0, |l| usize::try_from(l / 16).unwrap_or(usize::MAX)),
            held: 0,
        }
    }

    /// How often an idle process is read again (`[processes] idle_recheck_secs`); zero reads
    /// every process every sample.
    pub fn set_idle_recheck(&mut self, every: Duration) {
        self.idle_recheck = every;
    }

    /// What was read so far.
    pub fn read_stats(&self) -> ReadStats {
        self.stats
    }

    /// The process table this collector follows.
    pub fn table(&self) -> ProcTable {
        self.table.clone()
    }

    /// One sample at `now`: the `top_n` processes by CPU share since their previous read (only
    /// those that used some CPU), the `top_n` by RSS (only those with some), and every live pid
    /// in `interesting`, each once with all its reasons. A process that exits during the
    /// sample is left out silently.
    ///
    /// A process interesting only for the weight files it holds ([`ProcessReason::Weights`]
    /// alone) is described when it is new, when it used CPU since its previous read, and
    /// otherwise once in each wall-clock minute (`weights_due`), not at every sample: see
    /// [`ProcessCollector::sample_at`].
    pub fn sample(
        &mut self,
        now: Instant,
        top_n: usize,
        interesting: &[(u32, ProcessReason)],
    ) -> ProcessSample {
        self.sample_at(now, unix_now_ms(), top_n, interesting)
    }

    /// [`ProcessCollector::sample`] at `now`, the wall clock reading `unix_ms`.
    ///
    /// What the collector does with a report's processes (collector `derive.rs`,
    /// `store/containers.rs`, `store/*/ingest.rs`): their names name the flows' owners and the
    /// GPU users of the same report, and a containerised process gives its container row, one
    /// per (minute, pid); their CPU shares and RSS are checked, not stored. So the owners of the
    /// report's flows, the GPU users and the top N are described at every sample, and a process
    /// that holds weights and nothing else — a node of inference pods holds hundreds, idle
    /// between requests — is read and described once in every minute (its `stat` read then,
    /// like any other idle process's in turn otherwise), at every sample while it uses CPU, and
    /// at once when it is new: each minute's container rows are the same as before.
    pub fn sample_at(
        &mut self,
        now: Instant,
        unix_ms: i64,
        top_n: usize,
        interesting: &[(u32, ProcessReason)],
    ) -> ProcessSample {
        let uptime_ticks = read_uptime_ticks(&self.proc_root.join("uptime"));
        let elapsed = self
            .prev_at
            .and_then(|prev| now.checked_duration_since(prev))
            .unwrap_or(Duration::ZERO);
        let live = self.table.refresh(Duration::ZERO);

        // Forget processes that left, or whose pid was born again.
        self.known
            .retain(|pid, k| live.get(pid).is_some_and(|g| g.born == k.generation.born));

        // Which processes to read now: every interesting one, except those that hold weights
        // and nothing else, whose description is not due this sample.
        let weights_only = weights_only(interesting);
        let spread = elapsed < WEIGHTS_SPREAD_BELOW;
        let minute = unix_ms.div_euclid(60_000);
        let due = |pid: u32, known: &BTreeMap<u32, Known>| {
            !weights_only.contains(&pid)
                || weights_due(
                    pid,
                    known.get(&pid).and_then(|k| k.described),
                    unix_ms,
                    spread,
                )
        };
        let wanted: HashSet<u32> = interesting
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| due(*p, &self.known))
            .collect();
        let mut read: Vec<u32> = Vec::new();
        let mut idle = 0usize;
        for (&pid, g) in live.iter() {
            match self.known.get(&pid) {
                None => read.push(pid),
                Some(k) if k.busy || k.generation.exec != g.exec || wanted.contains(&pid) => {
                    read.push(pid);
                }
                Some(_) => idle += 1,
            }
        }
        let mut chosen: HashSet<u32> = read.iter().copied().collect();
        // The top N by memory as last read: read again, so their figures are current; at
        // every sample while they stay on top, so their `stat` is kept open like a busy one's
        // (on the node of pods, the top N, idle model servers, were opened by path at every
        // sample: 30 of its 45 opens a second).
        let top_memory: HashSet<u32> = self.top_by_rss(top_n).into_iter().collect();
        for &pid in &top_memory {
            if chosen.insert(pid) {
                read.push(pid);
                idle = idle.saturating_sub(1);
            }
        }
        // Idle processes in turn: enough of them that each is read within `idle_recheck`.
        let quota = if self.idle_recheck.is_zero() {
            idle
        } else {
            let share = elapsed.as_secs_f64() / self.idle_recheck.as_secs_f64();
            ((idle as f64 * share).ceil() as usize).min(idle)
        };
        if quota > 0 {
            let after: Vec<u32> = self
                .known
                .range(self.cursor.saturating_add(1)..)
                .chain(self.known.range(..=self.cursor))
                .map(|(p, _)| *p)
                .filter(|p| !chosen.contains(p))
                .take(quota)
                .collect();
            if let Some(&last) = after.last() {
                self.cursor = last;
            }
            for pid in after {
                chosen.insert(pid);
                read.push(pid);
            }
        }

        let mut fresh: HashMap<u32, Fresh> = HashMap::with_capacity(read.len());
        let mut stat_errors = 0;
        self.held = self.known.values().filter(|k| k.file.is_some()).count();
        for pid in read {
            let hold = wanted.contains(&pid) || top_memory.contains(&pid);
            match self.read_known(pid, live.get(&pid).copied(), now, elapsed, hold) {
                Ok(Some(f)) => {
                    fresh.insert(pid, f);
                }
                Ok(None) => stat_errors += 1,
                Err(err) if is_gone(&err) => {
                    self.known.remove(&pid);
                }
                Err(_) => stat_errors += 1,
            }
        }
        let kept = live.len().saturating_sub(fresh.len()) as u64;
        self.stats.stat_reads += fresh.len() as u64;
        self.stats.stat_kept += kept;
        cache::PROCESS_STAT.misses(fresh.len() as u64);
        cache::PROCESS_STAT.hits(kept);
        cache::PROCESS_STAT.entries(self.known.len());

        // Selection: top N by CPU share, top N by RSS (ties by pid), and the interesting pids.
        let mut reasons: BTreeMap<u32, Vec<ProcessReason>> = BTreeMap::new();
        let rate = |f: &Fresh| {
            if f.secs > 0.0 {
                f.ticks as f64 / f.secs
            } else {
                f.ticks as f64
            }
        };
        let mut busy: Vec<(u32, f64)> = fresh
            .iter()
            .filter(|(_, f)| f.ticks > 0)
            .map(|(p, f)| (*p, rate(f)))
            .collect();
        busy.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for &(pid, _) in busy.iter().take(top_n) {
            reasons.entry(pid).or_default().push(ProcessReason::TopCpu);
        }
        for pid in self.top_by_rss(top_n) {
            reasons
                .entry(pid)
                .or_default()
                .push(ProcessReason::TopMemory);
        }
        let mut weights_kept = 0u64;
        for &(pid, reason) in interesting {
            // A weight holder not due: described only when it ran since its previous read
            // or is described for another reason anyway.
            if reason == ProcessReason::Weights
                && !wanted.contains(&pid)
                && !reasons.contains_key(&pid)
                && fresh.get(&pid).is_none_or(|f| f.ticks == 0)
            {
                weights_kept += 1;
                continue;
            }
            reasons.entry(pid).or_default().push(reason);
        }
        cache::WEIGHT_USER_DESCRIPTIONS.hits(weights_kept);
        cache::WEIGHT_USER_DESCRIPTIONS
            .misses((weights_only.len() as u64).saturating_sub(weights_kept));

        // The details, for the selected processes only.
        let mut processes = Vec::with_capacity(reasons.len());
        for (pid, mut why) in reasons {
            why.sort_unstable();
            why.dedup();
            let f = match fresh.get(&pid) {
                Some(f) => Some(*f),
                None if self.known.contains_key(&pid) => {
                    // Selected from an earlier read (top memory): read it now.
                    match self.read_known(pid, live.get(&pid).copied(), now, elapsed, false) {
                        Ok(Some(f)) => Some(f),
                        Err(err) if is_gone(&err) => {
                            self.known.remove(&pid);
                            None
                        }
                        _ => None,
                    }
                }
                // An interesting pid not in the table (started since, or a thread id).
                None => self
                    .read_known(pid, None, now, elapsed, false)
                    .ok()
                    .flatten(),
            };
            let Some(f) = f else {
                continue;
            };
            let cpu_percent = if f.secs > 0.0 {
                (f.ticks as f64 / (f.secs * USER_HZ as f64) * 100.0) as f32
            } else {
                0.0
            };
            if let Some(mut info) = self.details_cached(pid, now) {
                info.cpu_percent = cpu_percent;
                info.reasons = why.into_iter().map(|r| r as i32).collect();
                processes.push(info);
                if let Some(k) = self.known.get_mut(&pid) {
                    k.described = Some(minute);
                }
            }
        }
        // Threads and other pids outside the table were read for this sample only.
        self.known.retain(|pid, _| live.contains_key(pid));
        cache::PROCESS_DETAIL.entries(self.known.values().filter(|k| k.detail.is_some()).count());

        self.prev_at = Some(now);
        self.prev_uptime_ticks = uptime_ticks;
        ProcessSample {
            processes,
            total: self.known.len(),
            stat_errors,
        }
    }

    /// The `n` known processes with the most resident memory (ties by pid).
    fn top_by_rss(&self, n: usize) -> Vec<u32> {
        if n == 0 {
            return Vec::new();
        }
        let mut v: Vec<(u64, u32)> = self
            .known
            .iter()
            .filter(|(_, k)| k.stat.rss_pages > 0)
            .map(|(p, k)| (k.stat.rss_pages, *p))
            .collect();
        // The n largest without sorting them all (linear), then those n in order.
        let order = |a: &(u64, u32), b: &(u64, u32)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
        if v.len() > n {
            v.select_nth_unstable_by(n - 1, order);
            v.truncate(n);
        }
        v.sort_unstable_by(order);
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// Read `pid`'s stat now and update what is known of it; its ticks since its previous read.
    /// `Ok(None)` when the file does not parse.
    /// Reads one process's `stat` into `known`; `hold`: it is read at every sample whatever
    /// its CPU (a wanted pid), so its file is kept open like a busy one's.
    fn read_known(
        &mut self,
        pid: u32,
        generation: Option<Gen>,
        now: Instant,
        elapsed: Duration,
        hold: bool,
    ) -> io::Result<Option<Fresh>> {
        let held = self.known.get_mut(&pid).and_then(|k| k.file.take());
        if held.is_some() {
            self.held = self.held.saturating_sub(1);
        }
        let (stat, file) = self.read_stat_held(pid, held)?;
        let Some(stat) = stat else {
            return Ok(None);
        };
        let generation = generation.unwrap_or(Gen { born: 0, exec: 0 });
        let same =
            |k: &Known| k.stat.starttime == stat.starttime && k.generation.born == generation.born;
        // The details move to the new entry (no copy).
        let (detail, described) = match self.known.get_mut(&pid) {
            Some(k) if same(k) => (k.detail.take(), k.described),
            _ => (None, None),
        };
        let prev = self.known.get(&pid).filter(|k| same(k));
        let fresh = match prev {
            Some(k) => Fresh {
                ticks: stat.ticks.saturating_sub(k.stat.ticks),
                secs: now.saturating_duration_since(k.read_at).as_secs_f64(),
            },
            // A new process counts all its ticks if it started after the previous sample
            // began, else none (it ran before the agent looked).
            None if self.prev_at.is_some()
                && self
                    .prev_uptime_ticks
                    .is_some_and(|up| stat.starttime >= up) =>
            {
                Fresh {
                    ticks: stat.ticks,
                    secs: elapsed.as_secs_f64(),
                }
            }
            None => Fresh {
                ticks: 0,
                secs: elapsed.as_secs_f64(),
            },
        };
        // A first read says nothing about its rate: read it again next sample.
        let busy = prev.is_none() || fresh.ticks > 0;
        // Kept open while it will be read at the next sample too; a first read (a process
        // that may live for a moment) does not keep it.
        let keep = (hold || (busy && prev.is_some())) && self.held < self.held_max;
        let file = keep.then_some(file);
        self.held += usize::from(file.is_some());
        self.known.insert(
            pid,
            Known {
                generation,
                file,
                stat,
                read_at: now,
                busy,
                detail,
                described,
            },
        );
        Ok(Some(fresh))
    }

    /// The details of a known process: kept from an earlier read while it is the same
    /// program, else read.
    fn details_cached(&mut self, pid: u32, now: Instant) -> Option<pb::ProcessInfo> {
        let k = self.known.get(&pid)?;
        let stat = k.stat.clone();
        let generation = k.generation;
        if let Some((info, g, at)) = k.detail.as_deref()
            && *g == generation
            && info.name == stat.name
            && now.saturating_duration_since(*at) < DETAIL_MAX_AGE
        {
            let mut info = info.clone();
            info.parent_pid = stat.ppid;
            info.rss_bytes = stat.rss_pages.saturating_mul(self.page_size);
            self.stats.detail_kept += 1;
            cache::PROCESS_DETAIL.hit();
            return Some(info);
        }
        let info = self.details(pid, stat, now)?;
        self.stats.detail_reads += 1;
        cache::PROCESS_DETAIL.miss();
        if let Some(k) = self.known.get_mut(&pid) {
            k.detail = Some(Box::new((info.clone(), generation, now)));
        }
        Some(info)
    }

    /// One process, without a CPU share or reasons; `None` when it does not exist (or its `stat`
    /// cannot be read).
    pub fn read(&mut self, pid: u32) -> Option<pb::ProcessInfo> {
        let stat = self.read_stat(pid).ok().flatten()?;
        self.details(pid, stat, Instant::now())
    }

    /// `Ok(None)` when the file was read but does not parse.
    fn read_stat(&mut self, pid: u32) -> io::Result<Option<Stat>> {
        self.read_stat_held(pid, None).map(|(s, _)| s)
    }

    /// `stat` through `held` (kept open from an earlier read) or a file opened now, which is
    /// handed back with what it said (`None` when it does not parse). A held file of a
    /// process that has exited fails (`ESRCH`, or nothing read): gone.
    fn read_stat_held(
        &mut self,
        pid: u32,
        held: Option<fs::File>,
    ) -> io::Result<(Option<Stat>, fs::File)> {
        use std::os::unix::fs::FileExt;
        let file = match held {
            Some(f) => f,
            None => fs::File::open(self.pid_dir(pid).join("stat"))?,
        };
        self.buf.clear();
        self.buf.resize(1024, 0);
        let mut n = 0;
        loop {
            let got = file.read_at(&mut self.buf[n..], n as u64)?;
            if got == 0 {
                break;
            }
            n += got;
            // `stat` is one line, produced whole by one read when the buffer holds it: a
            // second read only to see the end of the file was half of the reads' calls.
            if n < self.buf.len() && self.buf[n - 1] == b'\n' {
                break;
            }
            if n == self.buf.len() {
                self.buf.resize(n * 2, 0);
            }
        }
        self.buf.truncate(n);
        if n == 0 {
            return Err(io::Error::from_raw_os_error(ESRCH));
        }
        Ok((parse_stat(&self.buf), file))
    }

    /// The details of one process; `None` when it exited.
    fn details(&mut self, pid: u32, stat: Stat, now: Instant) -> Option<pb::ProcessInfo> {
        let dir = self.pid_dir(pid);
        // `status` exists for as long as the process does: its absence means the process left.
        let status = match fs::read_to_string(dir.join("status")) {
            Ok(text) => text,
            Err(err) if is_gone(&err) => return None,
            Err(_) => String::new(),
        };
        let user = effective_uid(&status)
            .map(|uid| self.users.name(uid, now))
            .unwrap_or_default();
        let exe = fs::read_link(dir.join("exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (cgroup, container_id) = fs::read_to_string(dir.join("cgroup"))
            .map(|text| cgroup_and_container(&text))
            .unwrap_or_default();
        let start_time_unix_ms = self.boot_time_ms.map_or(0, |boot| {
            let since_boot = stat.starttime.saturating_mul(1000) / USER_HZ;
            boot.saturating_add(i64::try_from(since_boot).unwrap_or(i64::MAX))
        });
        Some(pb::ProcessInfo {
            pid,
            parent_pid: stat.ppid,
            name: stat.name,
            exe,
            cmdline: read_cmdline(&dir.join("cmdline")),
            user,
            start_time_unix_ms,
            cgroup,
            container_id: container_id.unwrap_or_default(),
            cpu_percent: 0.0,
            rss_bytes: stat.rss_pages.saturating_mul(self.page_size),
            reasons: Vec::new(),
            netns_inode: namespaces::of_pid(&self.proc_root, pid, namespaces::NET).unwrap_or(0),
            mntns_inode: namespaces::of_pid(&self.proc_root, pid, namespaces::MNT).unwrap_or(0),
            ..Default::default()
        })
    }

    fn pid_dir(&self, pid: u32) -> PathBuf {
        self.proc_root.join(pid.to_string())
    }
}

/// One process from `/proc`, without a CPU share or reasons (a one-off lookup: it reads
/// `/etc/passwd` each time; keep a [`ProcessCollector`] and call [`ProcessCollector::read`] to
/// look up many).
pub fn read_process(pid: u32) -> Option<pb::ProcessInfo> {
    ProcessCollector::new().read(pid)
}

/// The container id (64 lowercase hex digits) in a cgroup path, from the innermost component
/// that names one: `/docker/<id>` and other cgroupfs layouts (`/kubepods/<qos>/pod<uid>/<id>`,
/// containerd's `/<namespace>/<id>`), or a `docker-`, `cri-containerd-`, `crio-` or `libpod-`
/// scope (`<prefix><id>.scope`). Conmon monitor scopes and paths without an id give `None`.
pub fn container_id_from_cgroup(path: &str) -> Option<String> {
    path.split('/')
        .rev()
        .find_map(container_id_in_component)
        .map(str::to_owned)
}

fn container_id_in_component(component: &str) -> Option<&str> {
    if is_container_id(component) {
        return Some(component);
    }
    let name = component.strip_suffix(".scope").unwrap_or(component);
    CONTAINER_SCOPE_PREFIXES
        .iter()
        .filter_map(|prefix| name.strip_prefix(prefix))
        .find(|id| is_container_id(id))
}

fn is_container_id(s: &str) -> bool {
    s.len() == CONTAINER_ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The cgroup to report and the container id in it, from `/proc/<pid>/cgroup`: the v2 (`0::`)
/// path unless it is `/` while v1 hierarchies exist (hybrid mode); else the v1 path when all
/// hierarchies agree, or `controllers:path` entries joined with `;`.
pub(crate) fn cgroup_and_container(text: &str) -> (String, Option<String>) {
    let mut unified = None;
    let mut v1: Vec<(&str, &str)> = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            unified = Some(path);
        } else {
            v1.push((controllers, path));
        }
    }
    if let Some(path) = unified
        && (path != "/" || v1.is_empty())
    {
        return (path.to_owned(), container_id_from_cgroup(path));
    }
    let container = v1
        .iter()
        .find_map(|(_, path)| container_id_from_cgroup(path));
    let cgroup = match v1.first() {
        Some((_, first)) if v1.iter().all(|(_, path)| path == first) => (*first).to_owned(),
        _ => v1
            .iter()
            .map(|(controllers, path)| format!("{controllers}:{path}"))
            .collect::<Vec<_>>()
            .join(";"),
    };
    (cgroup, container)
}

/// The pids whose only reason to be described is the weight files they hold.
fn weights_only(interesting: &[(u32, ProcessReason)]) -> HashSet<u32> {
    let mut only: HashSet<u32> = interesting
        .iter()
        .filter(|(_, r)| *r == ProcessReason::Weights)
        .map(|(p, _)| *p)
        .collect();
    for (p, r) in interesting {
        if *r != ProcessReason::Weights {
            only.remove(p);
        }
    }
    only
}

/// Whether a process that holds weights and nothing else, last described in the wall-clock
/// minute `described` (`None`: never), is to be described at `unix_ms`: once in every minute,
/// at the first sample at or after its second `pid % 20` of the minute when `spread` (samples
/// less than [`WEIGHTS_SPREAD_BELOW`] apart: one falls in the last 40 s of every minute), else
/// at the minute's first sample. A process never described is due at once.
fn weights_due(pid: u32, described: Option<i64>, unix_ms: i64, spread: bool) -> bool {
    let minute = unix_ms.div_euclid(60_000);
    match described {
        None => true,
        Some(m) if m == minute => false,
        Some(_) => !spread || unix_ms.rem_euclid(60_000) / 1000 >= i64::from(pid % 20),
    }
}

/// The wall clock in unix milliseconds.
fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Parses `/proc/<pid>/stat`. The name sits between the first `(` and the LAST `)`: it may hold
/// spaces and parentheses of its own.
fn parse_stat(bytes: &[u8]) -> Option<Stat> {
    let open = bytes.iter().position(|&b| b == b'(')?;
    let close = bytes.iter().rposition(|&b| b == b')')?;
    if close < open {
        return None;
    }
    let name = String::from_utf8_lossy(&bytes[open + 1..close]).into_owned();
    let rest = std::str::from_utf8(&bytes[close + 1..]).ok()?;
    // Fields after the name, numbered as in proc(5): 3 state, 4 ppid, 14 utime, 15 stime,
    // 22 starttime, 24 rss.
    let mut fields = rest.split_ascii_whitespace();
    let ppid: u32 = fields.nth(1)?.parse().ok()?;
    let utime: u64 = fields.nth(9)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let starttime: u64 = fields.nth(6)?.parse().ok()?;
    let rss_pages: u64 = fields.nth(1)?.parse().ok()?;
    Some(Stat {
        name,
        ppid,
        ticks: utime.saturating_add(stime),
        starttime,
        rss_pages,
    })
}

/// The effective uid: the second number of the `Uid:` line of `/proc/<pid>/status` (the wire
/// contract reports the effective user).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_ascii_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
}

/// The NUL-separated arguments of `/proc/<pid>/cmdline`, at most [`MAX_CMDLINE_ARGS`] of them and
/// [`MAX_CMDLINE_BYTES`] of text (the last one cut at a character boundary). Empty when unreadable
/// (kernel threads, zombies, permission).
fn read_cmdline(path: &Path) -> Vec<String> {
    let mut bytes = Vec::new();
    let limit = (MAX_CMDLINE_BYTES + MAX_CMDLINE_ARGS) as u64;
    let read = fs::File::open(path).and_then(|f| f.take(limit).read_to_end(&mut bytes));
    if read.is_err() {
        return Vec::new();
    }
    split_cmdline(&bytes)
}

fn split_cmdline(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    let mut args = Vec::new();
    let mut total = 0;
    for arg in bytes.split(|&b| b == 0).take(MAX_CMDLINE_ARGS) {
        let room = MAX_CMDLINE_BYTES - total;
        if room == 0 {
            break;
        }
        let arg = String::from_utf8_lossy(arg);
        let arg = truncate_utf8(&arg, room);
        total += arg.len();
        args.push(arg.to_owned());
    }
    args
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Whether a read failed because the process exited.
fn is_gone(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(ESRCH)
}

/// The first `KernelPageSize:` of `/proc/self/smaps`, in bytes (stops reading at it).
fn read_page_size(smaps: &Path) -> Option<u64> {
    let file = fs::File::open(smaps).ok()?;
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let kb = line.strip_prefix("KernelPageSize:")?.trim();
            let kb: u64 = kb.strip_suffix("kB")?.trim().parse().ok()?;
            (kb > 0).then(|| kb * 1024)
        })
}

/// `btime` of `/proc/stat` (boot time, unix seconds) in milliseconds.
fn read_boot_time_ms(stat: &Path) -> Option<i64> {
    let text = fs::read_to_string(stat).ok()?;
    let secs: i64 = text
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    secs.checked_mul(1000)
}

/// Seconds since boot from `/proc/uptime`, in ticks.
fn read_uptime_ticks(uptime: &Path) -> Option<u64> {
    let text = fs::read_to_string(uptime).ok()?;
    let secs: f64 = text.split_ascii_whitespace().next()?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then_some((secs * USER_HZ as f64) as u64)
}

/// uid → user name from a passwd file, read at most every [`PASSWD_REFRESH`].
#[derive(Debug)]
struct UserNames {
    path: PathBuf,
    names: HashMap<u32, String>,
    loaded_at: Option<Instant>,
}

impl UserNames {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            names: HashMap::new(),
            loaded_at: None,
        }
    }

    /// The name of `uid`, or the uid as text when the file does not know it.
    fn name(&mut self, uid: u32, now: Instant) -> String {
        let stale = self
            .loaded_at
            .is_none_or(|at| now.saturating_duration_since(at) >= PASSWD_REFRESH);
        if stale {
            self.reload(now);
        }
        self.names
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    /// Reads the file again; a file that cannot be read keeps the previous names until the next
    /// refresh.
    fn reload(&mut self, now: Instant) {
        self.loaded_at = Some(now);
        match fs::read_to_string(&self.path) {
            Ok(text) => self.names = parse_passwd(&text),
            Err(err) => {
                tracing::debug!(error = %err, path = %self.path.display(), "cannot read user names");
            }
        }
    }
}

/// `name:password:uid:…` lines; the first name of a uid wins, as with `getpwuid`.
fn parse_passwd(text: &str) -> HashMap<u32, String> {
    let mut names = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut fields = line.split(':');
        let (Some(name), Some(_), Some(uid)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if let Ok(uid) = uid.parse::<u32>()
            && !name.is_empty()
        {
            names.entry(uid).or_insert_with(|| name.to_owned());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const ID: &str = "3f4e2c1d9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e";
    const BOOT_SECS: i64 = 1_700_000_000;

    /// A fabricated process table: `/proc/stat` with a boot time, `/proc/uptime`, and a passwd.
    struct FakeProc {
        dir: tempfile::TempDir,
    }

    impl FakeProc {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let fake = Self { dir };
            fake.write("stat", &format!("cpu  1 2 3 4\nbtime {BOOT_SECS}\n"));
            fake.set_uptime_secs(1000);
            fake.write(
                "passwd",
                "root:x:0:0:root:/root:/bin/sh\n# comment\nalice:x:1000:1000::/home/alice:/bin/sh\n",
            );
            fake
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("proc")
        }

        /// A collector that reads every process every sample (the arithmetic under test);
        /// the turns of idle processes have tests of their own.
        fn collector(&self) -> ProcessCollector {
            let mut c = ProcessCollector::with_paths(self.root(), self.dir.path().join("passwd"));
            c.set_idle_recheck(Duration::ZERO);
            c
        }

        fn write(&self, rel: &str, text: &str) {
            let path = if rel == "passwd" {
                self.dir.path().join(rel)
            } else {
                self.root().join(rel)
            };
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(path, text).expect("write");
        }

        fn set_uptime_secs(&self, secs: u64) {
            self.write("uptime", &format!("{secs}.00 1.00\n"));
        }

        /// A process with a stat line (ticks split as utime = ticks, stime = 0) and a status.
        fn process(&self, pid: u32, comm: &str, ticks: u64, starttime: u64, rss_pages: u64) {
            self.write(
                &format!("{pid}/stat"),
                &stat_line(pid, comm, 1, ticks, starttime, rss_pages),
            );
            self.write(
                &format!("{pid}/status"),
                &format!("Name:\t{comm}\nUid:\t1000\t1000\t1000\t1000\n"),
            );
        }

        fn remove(&self, pid: u32) {
            fs::remove_dir_all(self.root().join(pid.to_string())).expect("rm");
        }
    }

    fn stat_line(pid: u32, comm: &str, ppid: u32, ticks: u64, starttime: u64, rss: u64) -> String {
        format!(
            "{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0 {ticks} 0 0 0 20 0 1 0 \
             {starttime} 12345678 {rss} 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n"
        )
    }

    fn pids(sample: &ProcessSample) -> Vec<u32> {
        sample.processes.iter().map(|p| p.pid).collect()
    }

    fn find(sample: &ProcessSample, pid: u32) -> &pb::ProcessInfo {
        sample
            .processes
            .iter()
            .find(|p| p.pid == pid)
            .unwrap_or_else(|| panic!("pid {pid} missing from {:?}", pids(sample)))
    }

    #[test]
    fn a_name_with_spaces_and_parentheses_is_read_up_to_the_last_parenthesis() {
        let line = stat_line(42, "my (odd) name) 9 9", 7, 30, 500, 12);
        let stat = parse_stat(line.as_bytes()).expect("parses");
        assert_eq!(stat.name, "my (odd) name) 9 9");
        assert_eq!(stat.ppid, 7);
        assert_eq!(stat.ticks, 30);
        assert_eq!(stat.starttime, 500);
        assert_eq!(stat.rss_pages, 12);
    }

    #[test]
    fn utime_and_stime_are_added() {
        let line = "9 (x) R 1 9 9 0 -1 0 0 0 0 0 70 5 0 0 20 0 1 0 88 0 3 0\n";
        let stat = parse_stat(line.as_bytes()).expect("parses");
        assert_eq!((stat.ticks, stat.starttime, stat.rss_pages), (75, 88, 3));
    }

    #[test]
    fn a_truncated_or_garbled_stat_line_does_not_parse() {
        assert_eq!(parse_stat(b"9 (x) R 1 9 9 0"), None);
        assert_eq!(
            parse_stat(b"9 x R 1 9 9 0 -1 0 0 0 0 0 70 5 0 0 20 0 1 0 88 0 3"),
            None
        );
        assert_eq!(parse_stat(b""), None);
        assert_eq!(parse_stat(b") 9 ("), None);
    }

    #[test]
    fn a_fabricated_process_is_reported_with_every_field() {
        let fake = FakeProc::new();
        fake.process(300, "python3 (worker)", 40, 2_500, 10);
        fake.write("300/cmdline", "python3\0-m\0vllm serve\0\0--port\0");
        fake.write(
            "300/cgroup",
            &format!("0::/system.slice/docker-{ID}.scope\n"),
        );
        let mut c = fake.collector();
        let s = c.sample(Instant::now(), 0, &[(300, ProcessReason::Weights)]);
        let p = find(&s, 300);
        assert_eq!(p.name, "python3 (worker)");
        assert_eq!(p.parent_pid, 1);
        assert_eq!(p.cmdline, ["python3", "-m", "vllm serve", "", "--port"]);
        assert_eq!(p.user, "alice");
        assert_eq!(p.start_time_unix_ms, BOOT_SECS * 1000 + 25_000);
        assert_eq!(p.rss_bytes, 10 * DEFAULT_PAGE_SIZE);
        assert_eq!(p.cgroup, format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(p.container_id, ID);
        assert_eq!(p.reasons, [ProcessReason::Weights as i32]);
        assert_eq!(p.exe, "");
        assert_eq!((s.total, s.stat_errors), (1, 0));
    }

    #[test]
    fn missing_exe_cmdline_and_cgroup_leave_those_fields_empty() {
        let fake = FakeProc::new();
        fake.process(5, "kthreadish", 0, 10, 0);
        let mut c = fake.collector();
        let s = c.sample(Instant::now(), 0, &[(5, ProcessReason::Gpu)]);
        let p = find(&s, 5);
        assert_eq!(p.name, "kthreadish");
        assert!(p.exe.is_empty() && p.cmdline.is_empty());
        assert!(p.cgroup.is_empty() && p.container_id.is_empty());
    }

    #[test]
    fn a_process_that_vanishes_is_skipped_without_counting_an_error() {
        let fake = FakeProc::new();
        fake.process(10, "stays", 0, 10, 1);
        // Listed, but its stat is gone (exited between the listing and the read).
        fs::create_dir_all(fake.root().join("11")).expect("mkdir");
        // Its stat was read but its status is gone (exited between the passes).
        fake.write("12/stat", &stat_line(12, "leaving", 1, 0, 10, 1));
        let mut c = fake.collector();
        let interesting = [
            (10, ProcessReason::Flow),
            (11, ProcessReason::Flow),
            (12, ProcessReason::Flow),
            (99, ProcessReason::Flow),
        ];
        let s = c.sample(Instant::now(), 0, &interesting);
        assert_eq!(pids(&s), [10]);
        assert_eq!(s.stat_errors, 0);
        assert_eq!(s.total, 2);
    }

    #[test]
    fn an_unparsable_stat_is_counted_as_an_error() {
        let fake = FakeProc::new();
        fake.process(10, "fine", 0, 10, 1);
        fake.write("13/stat", "13 (broken) R\n");
        fake.write("self/stat", "not a pid directory");
        let mut c = fake.collector();
        let s = c.sample(Instant::now(), 5, &[]);
        assert_eq!((s.total, s.stat_errors), (1, 1));
    }

    #[test]
    fn cpu_share_is_the_tick_delta_over_the_interval() {
        let fake = FakeProc::new();
        fake.process(20, "busy", 100, 50, 1);
        fake.process(21, "idle", 7, 50, 1);
        let mut c = fake.collector();
        let t0 = Instant::now();
        let first = c.sample(t0, 10, &[]);
        assert!(
            first.processes.iter().all(|p| p.cpu_percent == 0.0),
            "no interval yet"
        );
        fake.process(20, "busy", 250, 50, 1); // 150 ticks in 2 s = 75 %
        let s = c.sample(t0 + Duration::from_secs(2), 10, &[]);
        assert!((find(&s, 20).cpu_percent - 75.0).abs() < 0.01);
        assert_eq!(find(&s, 21).cpu_percent, 0.0);
        assert!(
            !find(&s, 21)
                .reasons
                .contains(&(ProcessReason::TopCpu as i32)),
            "a process that used no CPU is not a top-CPU process"
        );
    }

    #[test]
    fn a_reused_pid_counts_only_the_new_process_ticks() {
        let fake = FakeProc::new();
        fake.process(30, "old", 5_000, 50, 1);
        fake.process(31, "missed", 10, 60, 1);
        let mut c = fake.collector();
        let t0 = Instant::now();
        c.sample(t0, 10, &[]);
        // uptime was 1000 s = 100_000 ticks at the first sample.
        fake.set_uptime_secs(1001);
        fake.process(30, "new", 40, 100_050, 1); // started after the first sample
        fake.process(32, "also new", 20, 100_010, 1);
        fake.process(33, "older than the sample", 900, 99_000, 1); // missed by the first listing
        let s = c.sample(t0 + Duration::from_secs(1), 10, &[]);
        assert!((find(&s, 30).cpu_percent - 40.0).abs() < 0.01);
        assert_eq!(find(&s, 30).name, "new");
        assert!((find(&s, 32).cpu_percent - 20.0).abs() < 0.01);
        assert_eq!(find(&s, 33).cpu_percent, 0.0);
    }

    #[test]
    fn top_n_ties_break_by_pid_and_reasons_merge_with_interesting_pids() {
        let fake = FakeProc::new();
        for pid in 40..46 {
            fake.process(pid, "p", 0, 50, 1);
        }
        let mut c = fake.collector();
        let t0 = Instant::now();
        c.sample(t0, 2, &[]);
        // CPU: 45 > 44 = 43 > others; RSS: 40 > 41 = 42 > others.
        fake.process(45, "p", 90, 50, 1);
        fake.process(44, "p", 50, 50, 1);
        fake.process(43, "p", 50, 50, 1);
        fake.process(40, "p", 0, 50, 900);
        fake.process(41, "p", 0, 50, 500);
        fake.process(42, "p", 0, 50, 500);
        let interesting = [
            (45, ProcessReason::Gpu),
            (45, ProcessReason::Gpu),
            (41, ProcessReason::Flow),
        ];
        let s = c.sample(t0 + Duration::from_secs(1), 2, &interesting);
        assert_eq!(pids(&s), [40, 41, 43, 45]);
        let reasons = |pid| find(&s, pid).reasons.clone();
        use ProcessReason::*;
        assert_eq!(reasons(45), [TopCpu as i32, Gpu as i32]);
        assert_eq!(reasons(43), [TopCpu as i32]);
        assert_eq!(reasons(40), [TopMemory as i32]);
        assert_eq!(reasons(41), [TopMemory as i32, Flow as i32]);
    }

    #[test]
    fn a_process_read_every_sample_is_read_through_its_held_stat_until_it_exits() {
        let mut c = ProcessCollector::with_paths(DEFAULT_PROC_ROOT, DEFAULT_PASSWD_PATH);
        if c.held_max == 0 {
            crate::skipped::record(
                "collect::procs::tests::a_process_read_every_sample_is_read_through_its_held_stat_until_it_exits",
                "no descriptor limit readable: no stat file is held",
            );
            return;
        }
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("sh");
        let pid = child.id();
        let interesting = [(pid, ProcessReason::Flow)];
        let t0 = Instant::now();
        c.sample(t0, 0, &interesting);
        c.sample(t0 + Duration::from_secs(1), 0, &interesting);
        let held = c.known.get(&pid).is_some_and(|k| k.file.is_some());
        // What the held file says moves with the process: its ticks grow while it spins.
        let first = c.known.get(&pid).map(|k| k.stat.ticks);
        let mut i = 2;
        let grew = loop {
            std::thread::sleep(Duration::from_millis(50));
            c.sample(t0 + Duration::from_secs(i), 0, &interesting);
            let now = c.known.get(&pid).map(|k| k.stat.ticks);
            if now > first || i > 600 {
                break now > first;
            }
            i += 1;
        };
        let still_held = c.known.get(&pid).is_some_and(|k| k.file.is_some());
        // A held file of a process that has exited fails to read: gone.
        let file = c.known.get_mut(&pid).and_then(|k| k.file.take());
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            held,
            "a wanted process keeps its stat open after its first read"
        );
        assert!(grew, "ticks read through the held file grew");
        assert!(still_held);
        let err = c
            .read_stat_held(pid, file)
            .expect_err("an exited process's stat");
        assert!(is_gone(&err), "{err}");
        c.sample(t0 + Duration::from_secs(i + 1), 0, &interesting);
        assert!(!c.known.contains_key(&pid));
    }

    #[test]
    fn an_idle_top_memory_process_is_read_through_its_held_stat() {
        let fake = FakeProc::new();
        // 100 and 101 are the two largest (the top 2 by memory); all are idle.
        for pid in 100..106 {
            fake.process(pid, "idle", 5, 50, if pid < 102 { 1000 } else { 10 });
        }
        let mut c = fake.collector();
        if c.held_max == 0 {
            crate::skipped::record(
                "collect::procs::tests::an_idle_top_memory_process_is_read_through_its_held_stat",
                "no descriptor limit readable: no stat file is held",
            );
            return;
        }
        c.set_idle_recheck(Duration::from_secs(3600));
        let t0 = Instant::now();
        for i in 0..3 {
            c.sample(t0 + Duration::from_secs(i), 2, &[]);
        }
        let held =
            |c: &ProcessCollector, pid: u32| c.known.get(&pid).is_some_and(|k| k.file.is_some());
        assert!(
            held(&c, 100) && held(&c, 101),
            "the top 2 keep their stat open"
        );
        assert!(
            !held(&c, 102),
            "an idle process outside the top keeps nothing open"
        );
        // Read through the held file: what the process says now is what is reported.
        fake.process(100, "idle", 5, 50, 3000);
        let s = c.sample(t0 + Duration::from_secs(3), 2, &[]);
        let p = s.processes.iter().find(|p| p.pid == 100).expect("reported");
        assert_eq!(p.rss_bytes, 3000 * c.page_size);
        assert!(held(&c, 100));
    }

    #[test]
    fn idle_processes_are_read_in_turn_and_a_waking_one_counts_every_tick() {
        let fake = FakeProc::new();
        // No resident memory: none is a top-memory process (those are read every sample).
        for pid in 100..110 {
            fake.process(pid, "idle", 5, 50, 0);
        }
        let mut c = fake.collector();
        c.set_idle_recheck(Duration::from_secs(10));
        let t0 = Instant::now();
        c.sample(t0, 0, &[]);
        c.sample(t0 + Duration::from_secs(1), 0, &[]);
        assert_eq!(
            c.read_stats().stat_reads,
            20,
            "first reads say nothing of a rate: twice"
        );
        // pid 105 wakes up; the others stay idle. Ten samples, one second apart: each idle
        // process is read once in the ten seconds, one a sample.
        fake.process(105, "idle", 305, 50, 0);
        let mut seen_at = None;
        for i in 2..12u64 {
            let before = c.read_stats();
            let s = c.sample(t0 + Duration::from_secs(i), 1, &[]);
            let after = c.read_stats();
            if seen_at.is_none() {
                assert_eq!(after.stat_reads - before.stat_reads, 1, "sample {i}");
                assert_eq!(after.stat_kept - before.stat_kept, 9, "sample {i}");
            }
            if let Some(p) = s.processes.iter().find(|p| p.pid == 105) {
                // 300 ticks since its read at t0 + 1 s.
                let expect = 300.0 / (i - 1) as f32;
                assert!(
                    (p.cpu_percent - expect).abs() < 0.01,
                    "{} vs {expect}",
                    p.cpu_percent
                );
                assert!(seen_at.is_none());
                seen_at = Some(i);
            }
        }
        assert!(
            seen_at.is_some(),
            "the waking process is read within idle_recheck"
        );
    }

    #[test]
    fn a_weight_holder_is_described_once_a_minute_while_idle_and_at_every_sample_while_busy() {
        let fake = FakeProc::new();
        // 300 holds weights only, 301 weights and a flow; no resident memory (not top N).
        fake.process(300, "mapper", 5, 50, 0);
        fake.process(301, "server", 5, 50, 0);
        // Idle processes read before 300 in turn (one a sample, the least quota).
        for pid in 10..210 {
            fake.process(pid, "idle", 5, 50, 0);
        }
        let mut c = fake.collector();
        c.set_idle_recheck(Duration::from_secs(3600));
        let why = [
            (300, ProcessReason::Weights),
            (301, ProcessReason::Weights),
            (301, ProcessReason::Flow),
        ];
        let t0 = Instant::now();
        // 12:00:10 on some day; samples one second apart (spread: pid 300's second is 0).
        let m0: i64 = 1_800_000_000_000 / 60_000 * 60_000 + 10_000;
        let at = |i: u64| (t0 + Duration::from_secs(i), m0 + i as i64 * 1000);
        let described = |c: &mut ProcessCollector, i: u64| {
            let (t, ms) = at(i);
            pids(&c.sample_at(t, ms, 0, &why))
        };
        assert_eq!(described(&mut c, 0), [300, 301], "new: described at once");
        // The rest of the minute (49 samples): the flow owner at every sample, the idle weight
        // holder not at all, and its stat is not read either (after the second sample, where
        // every first read is read again: the flow owner and one idle process in turn).
        for i in 1..50 {
            let before = c.read_stats().stat_reads;
            assert_eq!(described(&mut c, i), [301], "sample {i}");
            let reads = c.read_stats().stat_reads - before;
            assert!(i == 1 || reads == 2, "sample {i}: {reads} stat reads");
        }
        // The next minute's first sample describes it again, with its RSS read then.
        fake.process(300, "mapper", 5, 50, 9);
        assert_eq!(described(&mut c, 50), [300, 301]);
        let (t, ms) = at(51);
        let s = c.sample_at(t, ms, 0, &why);
        assert_eq!(pids(&s), [301]);
        // It wakes: its ticks are counted at its next read and it is described while busy.
        fake.process(300, "mapper", 405, 50, 9);
        let mut woke = None;
        for i in 52..120 {
            let (t, ms) = at(i);
            let s = c.sample_at(t, ms, 0, &why);
            if let Some(p) = s.processes.iter().find(|p| p.pid == 300) {
                assert!(
                    p.cpu_percent > 0.0,
                    "sample {i}: described with its CPU share"
                );
                assert_eq!(p.rss_bytes, 9 * DEFAULT_PAGE_SIZE);
                woke = Some(i);
                break;
            }
        }
        // Idle processes are read in turn within idle_recheck (an hour here): the first read
        // after waking is the next minute's description at the latest.
        assert_eq!(woke, Some(110), "described at the next minute's sample");
        fake.process(300, "mapper", 505, 50, 9);
        let (t, ms) = at(111);
        let s = c.sample_at(t, ms, 0, &why);
        assert_eq!(pids(&s), [300, 301], "busy: described at every sample");
        assert!(find(&s, 300).cpu_percent > 99.0);
    }

    #[test]
    fn a_weight_holder_is_due_once_per_wall_clock_minute() {
        let m = 29_000_000_i64; // a minute's start, in minutes
        let ms = |sec: i64| m * 60_000 + sec * 1000;
        assert!(weights_due(7, None, ms(0), true), "never described");
        assert!(
            !weights_due(7, Some(m), ms(59), true),
            "described this minute"
        );
        assert!(
            !weights_due(7, Some(m - 1), ms(6), true),
            "before its second"
        );
        assert!(weights_due(7, Some(m - 1), ms(7), true), "at its second");
        assert!(weights_due(27, Some(m - 1), ms(7), true), "27 % 20 = 7");
        assert!(
            weights_due(19, Some(m - 3), ms(0), false),
            "not spread: at once"
        );
    }

    fn wait_for_comm(pid: u32, comm: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::read_to_string(format!("/proc/{pid}/comm")).map_or(true, |c| c.trim() != comm) {
            assert!(Instant::now() < deadline, "{pid} never became {comm}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_real_process_that_execs_or_exits_is_seen_at_the_next_sample() {
        use std::io::Write;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read x; exec sleep 30"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let pid = child.id();
        let mut c = ProcessCollector::new();
        let flow = [(pid, ProcessReason::Flow)];
        wait_for_comm(pid, "sh");
        let t0 = Instant::now();
        let s = c.sample(t0, 0, &flow);
        assert_eq!(find(&s, pid).name, "sh");
        // The event of sh's own exec may arrive after the first sample: it is in by now.
        c.sample(t0 + Duration::from_millis(500), 0, &flow);
        let before = c.read_stats();
        let s = c.sample(t0 + Duration::from_secs(1), 0, &flow);
        assert_eq!(find(&s, pid).name, "sh");
        assert_eq!(
            c.read_stats().detail_kept - before.detail_kept,
            1,
            "details kept while nothing changed"
        );
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"go\n")
            .expect("write");
        wait_for_comm(pid, "sleep");
        let s = c.sample(t0 + Duration::from_secs(2), 0, &flow);
        let p = find(&s, pid);
        assert_eq!(p.name, "sleep");
        assert!(p.exe.ends_with("/sleep"), "{}", p.exe);
        assert_eq!(p.cmdline, ["sleep", "30"]);
        child.kill().expect("kill");
        child.wait().expect("reap");
        let s = c.sample(t0 + Duration::from_secs(3), 0, &flow);
        assert!(
            s.processes.iter().all(|p| p.pid != pid),
            "gone at the next sample"
        );
        assert!(!c.known.contains_key(&pid));
    }

    #[test]
    fn the_baseline_keeps_only_live_pids() {
        let fake = FakeProc::new();
        fake.process(50, "a", 1, 50, 1);
        fake.process(51, "b", 1, 50, 1);
        let mut c = fake.collector();
        c.sample(Instant::now(), 1, &[]);
        assert_eq!(c.known.len(), 2);
        fake.remove(51);
        c.sample(Instant::now(), 1, &[]);
        assert_eq!(c.known.keys().copied().collect::<Vec<_>>(), [50]);
    }

    #[test]
    fn user_names_come_from_passwd_and_unknown_uids_stay_numeric() {
        let fake = FakeProc::new();
        fake.process(60, "a", 0, 50, 1);
        fake.write("61/stat", &stat_line(61, "b", 1, 0, 50, 1));
        fake.write("61/status", "Uid:\t0\t4242\t0\t0\n");
        let mut c = fake.collector();
        let s = c.sample(
            Instant::now(),
            0,
            &[(60, ProcessReason::Flow), (61, ProcessReason::Flow)],
        );
        assert_eq!(find(&s, 60).user, "alice");
        assert_eq!(find(&s, 61).user, "4242", "effective uid, not real");
    }

    #[test]
    fn passwd_is_read_again_only_after_five_minutes() {
        let fake = FakeProc::new();
        fake.process(60, "a", 0, 50, 1);
        let mut c = fake.collector();
        let t0 = Instant::now();
        let flow = [(60, ProcessReason::Flow)];
        assert_eq!(find(&c.sample(t0, 0, &flow), 60).user, "alice");
        fake.write("passwd", "bob:x:1000:1000::/:/bin/sh\n");
        let later = t0 + Duration::from_secs(60);
        assert_eq!(find(&c.sample(later, 0, &flow), 60).user, "alice");
        let stale = t0 + PASSWD_REFRESH;
        assert_eq!(find(&c.sample(stale, 0, &flow), 60).user, "bob");
    }

    #[test]
    fn cgroup_v1_paths_are_reported_once_when_they_agree_and_joined_when_not() {
        let same = format!("12:memory:/docker/{ID}\n11:cpu,cpuacct:/docker/{ID}\n");
        assert_eq!(
            cgroup_and_container(&same),
            (format!("/docker/{ID}"), Some(ID.to_owned()))
        );
        let mixed = format!("2:memory:/docker/{ID}\n1:name=systemd:/system.slice/docker.service\n");
        assert_eq!(
            cgroup_and_container(&mixed),
            (
                format!("memory:/docker/{ID};name=systemd:/system.slice/docker.service"),
                Some(ID.to_owned())
            )
        );
    }

    #[test]
    fn the_v2_cgroup_wins_unless_it_is_the_root_in_hybrid_mode() {
        let v2 = "0::/user.slice/user-1000.slice/session-3.scope\n";
        assert_eq!(
            cgroup_and_container(v2),
            (
                "/user.slice/user-1000.slice/session-3.scope".to_owned(),
                None
            )
        );
        let hybrid = format!("3:memory:/kubepods/burstable/pod1234/{ID}\n0::/\n");
        assert_eq!(
            cgroup_and_container(&hybrid),
            (
                format!("/kubepods/burstable/pod1234/{ID}"),
                Some(ID.to_owned())
            )
        );
        assert_eq!(cgroup_and_container("0::/\n"), ("/".to_owned(), None));
    }

    #[test]
    fn container_ids_are_found_for_each_runtime_layout() {
        let cases = [
            format!("/docker/{ID}"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/system.slice/docker-{ID}.scope/init.scope"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod6a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/\
                 cri-containerd-{ID}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/crio-{ID}.scope"
            ),
            format!("/kubepods/besteffort/pod6a1b2c3d-4e5f-6789-abcd-ef0123456789/{ID}"),
            format!("/kubepods/burstable/pod6a1b2c3d/crio-{ID}"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/default/{ID}"),
            format!("/docker/{}/docker/{ID}", "a".repeat(64)),
        ];
        for path in &cases {
            assert_eq!(
                container_id_from_cgroup(path).as_deref(),
                Some(ID),
                "{path}"
            );
        }
    }

    #[test]
    fn paths_without_a_container_give_no_id() {
        let cases = [
            "/".to_owned(),
            String::new(),
            "/user.slice/user-1000.slice/session-2.scope".to_owned(),
            "/system.slice/containerd.service".to_owned(),
            "/docker/3f4e2c1d9b8a".to_owned(),
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            format!("/kubepods.slice/crio-conmon-{ID}.scope"),
            format!("/docker/{}", ID.to_uppercase()),
            format!("/system.slice/docker-{ID}0.scope"),
        ];
        for path in &cases {
            assert_eq!(container_id_from_cgroup(path), None, "{path}");
        }
    }

    #[test]
    fn cmdline_is_cut_at_32_arguments_and_4_kib() {
        let many: Vec<u8> = (0..40)
            .flat_map(|i| format!("a{i}\0").into_bytes())
            .collect();
        let args = split_cmdline(&many);
        assert_eq!(args.len(), MAX_CMDLINE_ARGS);
        assert_eq!(args.last().map(String::as_str), Some("a31"));

        let mut long = "é".repeat(3000).into_bytes(); // 6000 bytes
        long.extend_from_slice(b"\0next\0");
        let args = split_cmdline(&long);
        assert_eq!(args.len(), 1);
        assert_eq!(args[0].len(), MAX_CMDLINE_BYTES);

        let two = [vec![b'x'; 4000], b"\0".to_vec(), vec![b'y'; 500]].concat();
        let args = split_cmdline(&two);
        assert_eq!(
            args.iter().map(String::len).sum::<usize>(),
            MAX_CMDLINE_BYTES
        );
        assert_eq!(args[1].len(), 96);
        assert!(split_cmdline(b"").is_empty());
    }

    #[test]
    fn page_size_and_boot_time_come_from_the_fabricated_root() {
        let fake = FakeProc::new();
        fake.write(
            "self/smaps",
            "00400000-00452000 r-xp 00000000 08:02 173521 /bin/x\nSize:  328 kB\nKernelPageSize:       64 kB\n",
        );
        fake.process(70, "p", 0, 100, 3);
        let mut c = fake.collector();
        let s = c.sample(Instant::now(), 1, &[]);
        assert_eq!(find(&s, 70).rss_bytes, 3 * 64 * 1024);
        assert_eq!(find(&s, 70).start_time_unix_ms, BOOT_SECS * 1000 + 1000);
    }

    fn current_user_name() -> String {
        let uid = fs::metadata("/proc/self").expect("/proc/self").uid();
        fs::read_to_string("/etc/passwd")
            .unwrap_or_default()
            .lines()
            .find(|l| l.split(':').nth(2) == Some(uid.to_string().as_str()))
            .and_then(|l| l.split(':').next().map(str::to_owned))
            .unwrap_or_else(|| uid.to_string())
    }

    #[test]
    fn this_test_process_is_reported_when_interesting() {
        let me = std::process::id();
        let mut c = ProcessCollector::new();
        let s = c.sample(Instant::now(), 3, &[(me, ProcessReason::Flow)]);
        let p = find(&s, me);
        let exe = std::env::current_exe().expect("current exe");
        assert_eq!(p.exe, exe.to_string_lossy());
        let comm = fs::read_to_string("/proc/self/comm").expect("comm");
        assert_eq!(p.name, comm.trim_end());
        assert!(p.rss_bytes > 0);
        assert_eq!(p.user, current_user_name());
        assert!(p.reasons.contains(&(ProcessReason::Flow as i32)));
        assert!(!p.cmdline.is_empty());
        assert!(p.start_time_unix_ms > 1_600_000_000_000);
        assert!(s.total > 1);
        assert!(s.processes.len() <= 3 + 3 + 1);
    }

    #[test]
    fn read_process_finds_this_process_and_not_a_missing_one() {
        let p = read_process(std::process::id()).expect("self");
        assert!(p.rss_bytes > 0);
        assert_eq!(p.parent_pid, std::os::unix::process::parent_id());
        assert!(p.reasons.is_empty());
        assert_eq!(read_process(u32::MAX), None);
    }

    #[test]
    fn a_busy_thread_makes_this_process_a_top_cpu_process() {
        let me = std::process::id();
        let ticks = || read_process_ticks(me);
        let mut c = ProcessCollector::new();
        let t0 = Instant::now();
        c.sample(t0, 10, &[]);
        // Spin until this process has used 40 ticks (400 ms) of CPU, however loaded the
        // machine is; the second sample is dated one second after the first, so the share
        // is at least 40 %.
        let start = ticks();
        let spinner = std::thread::spawn(move || {
            let mut n = 0u64;
            while read_process_ticks(me) < start + 40 {
                for _ in 0..100_000 {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            n
        });
        spinner.join().expect("spinner");
        let s = c.sample(t0 + Duration::from_secs(1), 10, &[]);
        let p = find(&s, me);
        assert!(p.cpu_percent > 20.0, "cpu {}", p.cpu_percent);
        assert!(p.reasons.contains(&(ProcessReason::TopCpu as i32)));
    }

    fn read_process_ticks(pid: u32) -> u64 {
        fs::read(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|b| parse_stat(&b))
            .map_or(0, |s| s.ticks)
    }

    #[test]
    fn one_sample_over_the_real_proc_reports_its_cost() {
        // Not an assertion: prints what a sample costs, for the module doc.
        let thread_ticks = || {
            fs::read("/proc/thread-self/stat")
                .ok()
                .and_then(|b| parse_stat(&b))
                .map_or(0, |s| s.ticks)
        };
        let mut c = ProcessCollector::new();
        c.sample(Instant::now(), 10, &[]);
        let runs: u32 = 50;
        let mut times = Vec::new();
        let mut last = ProcessSample::default();
        let ticks_before = thread_ticks();
        for _ in 0..runs {
            let start = Instant::now();
            last = c.sample(Instant::now(), 10, &[]);
            times.push(start.elapsed());
        }
        let cpu_ms = (thread_ticks() - ticks_before) as f64 * 1000.0 / USER_HZ as f64;
        times.sort();
        println!(
            "procs sample: wall median {:?} (min {:?}), CPU {:.2} ms per sample, \
             over {} processes, {} reported",
            times[times.len() / 2],
            times[0],
            cpu_ms / f64::from(runs),
            last.total,
            last.processes.len()
        );
    }
}
