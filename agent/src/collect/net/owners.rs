//! Socket → process: which pid holds a socket inode, found by reading the `socket:[N]` links of
//! `/proc/<pid>/fd/*`, and remembered so that a steady node costs no walk at all.
//!
//! [`OwnerCache::refresh`] is given the inodes of every live socket of a sample. It
//! - forgets inodes that are no longer live, and owners whose `/proc/<pid>` is gone;
//! - returns at once, reading nothing, when every live inode has a known owner (or is a known
//!   miss, see below) — the steady state;
//! - otherwise walks first the pids that already own sockets, those owning most first (servers
//!   accept new connections), stopping as soon as every wanted inode is found, and only then
//!   every other pid, for the sockets that still have a descriptor (one exact sock_diag lookup
//!   each: a socket closed since the dump is not searched for);
//! - inside a pid, re-reads only the links of descriptors it has not seen before or whose socket
//!   has gone (a descriptor remembered as socket X, with X still live, is not read again); in
//!   the last listing of every process, a descriptor remembered as a socket whose owner is not
//!   wanted (a pod's loopback connection) is not read again either while that socket is known
//!   open (this sample's dumps, and the sockets of namespaces whose sockets are unchanged):
//!   a node of pods holds thousands of them, and reading their links was most of a listing;
//!   and a process of the last listing whose count is unchanged, and whose every descriptor
//!   its previous walk remembered, is read at its remembered non-socket descriptors only,
//!   without listing its `fd/` (`OwnerCache::reread`): listing a pod's hundreds of connection
//!   descriptors was then most of a listing;
//! - remembers inodes that a complete walk did not find (owner invisible: no permission on
//!   `/proc/<pid>/fd` without root or `CAP_SYS_PTRACE` + `CAP_DAC_READ_SEARCH`; a socket held
//!   only by the kernel; a socket closed while its connection finishes) and looks for them again
//!   only after [`MISS_RETRY`], so one invisible socket does not cost a walk per sample; each
//!   further miss doubles that wait, up to [`MISS_RETRY_MAX`] (a socket held by the kernel, or
//!   by a process the agent cannot see, is never found: it cost a listing of every process's
//!   `fd/` every minute).
//!
//! Measured (`bench_footprint`, PERFORMANCE.md §3b fourth part): one socket on the bench VM
//! has no visible owner (a listener of a process outside the agent's view), and its search every
//! minute listed every `fd/` of 3,300 processes — the `socket_owner_walk` misses of a run.
//!
//! [`OwnerCache::glance`] does the same search between samples for the sockets of an owner
//! glance (TCP only, some namespaces only) without forgetting the owners of the sockets the
//! glance did not dump.
//!
//! Limits, on purpose: a socket shared by several processes (inherited over `fork`, passed over
//! a Unix socket) is attributed to the first pid found; threads are not walked separately (a
//! thread created without `CLONE_FILES` has a descriptor table of its own that is not seen);
//! a descriptor number reused for a new socket while the old socket stays open through a
//! duplicate is read again only once the old socket closes.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::collect::cache;
use crate::collect::net::glance::{Budget, thread_cpu};
use crate::collect::proctable::Gen;

/// How long an inode that a complete walk did not find is left alone before being looked for
/// again; each further miss of the same inode doubles it, up to [`MISS_RETRY_MAX`].
pub const MISS_RETRY: Duration = Duration::from_secs(60);
/// The longest wait between two searches for an inode that was never found: a socket held by
/// the kernel (a tunnel's UDP socket) or by a process the agent cannot see would otherwise cost
/// a listing of every process's `fd/` every minute for as long as it lives (about 66 ms at
/// 3,300 processes here).
pub const MISS_RETRY_MAX: Duration = Duration::from_secs(30 * 60);

/// CPU time the last listing of owner searches may take, per second of wall time (0.5 % of one
/// CPU): listing every process whose descriptor count is unchanged costs about 20 µs a process
/// (66 ms at 3,300 processes), the most expensive step of a search, and is needed only for a
/// socket whose owner closed a file and opened it (or whose owner cannot be seen at all).
pub const LISTING_CPU_PER_SEC: Duration = Duration::from_millis(5);
/// The most CPU time the listing budget saves up (one listing at about 2,500 processes).
pub const LISTING_CPU_BURST: Duration = Duration::from_millis(50);
/// How long a socket whose last listing the budget put off waits before it is searched again.
pub const LISTING_RETRY: Duration = Duration::from_secs(10);

/// What the walks have cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// `refresh` calls that read `/proc` (0 in the steady state).
    pub walks: u64,
    /// `/proc/<pid>/fd` directories listed.
    pub pids_walked: u64,
    /// Links read (`readlink`).
    pub links_read: u64,
    /// Processes passed over for an unchanged descriptor count (one `stat` each).
    pub pids_passed: u64,
    /// Processes of a last listing read at their remembered descriptors only (no listing of
    /// their `fd/`: see [`OwnerCache::refresh`]).
    pub pids_reread: u64,
    /// Last listings made (every process passed over, listed) and put off (a socket missed
    /// for the first time, or the budget spent).
    pub listings: u64,
    pub listings_put_off: u64,
    /// Wall time of the latest walk.
    pub last_walk: Duration,
}

/// The inode → pid cache.
#[derive(Debug)]
pub struct OwnerCache {
    proc_root: PathBuf,
    owners: HashMap<u32, u32>,
    /// Inodes a complete walk did not find: when, and how long until the next search.
    misses: HashMap<u32, (Instant, Duration)>,
    /// Inodes not found but by the last listing, which was put off: not searched before then.
    /// A socket is listed for only once it was missed at a previous search (most sockets not
    /// found at once are closing), and within the listing budget.
    put_off: HashMap<u32, Instant>,
    /// The last listings' CPU allowance ([`LISTING_CPU_PER_SEC`]).
    listing: Budget,
    /// Per walked process (bounded: one per live process, pruned with the process table or
    /// at each listing): what its latest walk found.
    fds: HashMap<u32, Walked>,
    /// The newest process generation (`Gen::born`) in the table at the previous search.
    born_seen: u64,
    stats: WalkStats,
}

/// One process's descriptors as of its latest walk.
#[derive(Debug)]
struct Walked {
    /// Its generation in the process table (`None`: no table).
    generation: Option<Gen>,
    /// How many descriptors it had (the size of `/proc/<pid>/fd`, Linux 6.2+; 0: unknown).
    count: u64,
    /// Its socket descriptors then: (descriptor, socket inode) of live sockets, by descriptor.
    socks: Box<[(u32, u32)]>,
    /// Its other socket descriptors then (sockets whose owner is not wanted: a pod's loopback
    /// connections), by descriptor: a listing does not read their links again while their
    /// sockets are still open (see [`OwnerCache::refresh`]'s `open_sockets`).
    others: Box<[(u32, u32)]>,
    /// Its descriptors then that were not sockets (files, pipes, devices; links it could not
    /// read), by descriptor; `None` when more than [`FILES_MAX`] or not all known (a descriptor
    /// closed during the walk): a listing then lists its `fd/` again.
    files: Option<Box<[u32]>>,
}

/// The most non-socket descriptors remembered per process (a listing reads each of them; a
/// process holding more is listed whole).
pub const FILES_MAX: usize = 256;

impl OwnerCache {
    /// A cache reading `<proc_root>/<pid>/fd`.
    pub fn new(proc_root: &Path) -> Self {
        Self {
            proc_root: proc_root.to_path_buf(),
            owners: HashMap::new(),
            misses: HashMap::new(),
            put_off: HashMap::new(),
            listing: Budget::new(LISTING_CPU_PER_SEC, LISTING_CPU_BURST),
            fds: HashMap::new(),
            born_seen: 0,
            stats: WalkStats::default(),
        }
    }

    /// The pid holding socket `inode`, when known.
    pub fn owner(&self, inode: u32) -> Option<u32> {
        self.owners.get(&inode).copied()
    }

    /// The walks' cost so far.
    pub fn stats(&self) -> WalkStats {
        self.stats
    }

    /// Bring the cache up to date with the live socket inodes of a sample (0 is ignored).
    ///
    /// `procs`, the live processes of the shared process table when there is one, tells which
    /// owners exited (their inodes are looked for again) without a `stat` per owner.
    ///
    /// A search looks through the processes that already own sockets first (busiest first),
    /// then the processes born since the previous search (a new socket is most often a new
    /// process's), then every other one, these two groups oldest first (a socket inherited
    /// over `fork` goes to the parent that opened it). A process whose number of descriptors
    /// is the same as at its previous walk, and whose sockets then are all still live, is
    /// passed over at first (one `stat` of `/proc/<pid>/fd` instead of listing it and reading
    /// its links: opening a socket adds a descriptor). Only when a socket is still not found
    /// are those listed too (one may have closed a file and opened the socket), owners first,
    /// before the socket counts as a miss. A socket not found among the owners is first asked
    /// about (`still_open`, an exact lookup in the kernel) before any other process is looked
    /// at: one closed since the dump (a short connection, a local scrape) has no descriptor
    /// left and needs no search (before, it cost a `stat` of every process).
    ///
    /// `open_sockets` gives every socket known to be open now, whether its owner is wanted or
    /// not (asked only when every process is listed): a descriptor that held one of the other
    /// sockets at its process's previous walk, and whose socket is still open, holds it still
    /// (a descriptor number is reused only once closed), so its link is not read again. On a
    /// node of pods that is most descriptors (each pod's loopback connections: 20,000 links read
    /// per listing in `bench_footprint`'s node of pods, before).
    pub fn refresh(
        &mut self,
        live: &HashSet<u32>,
        now: Instant,
        procs: Option<&HashMap<u32, Gen>>,
        still_open: &mut dyn FnMut(u32) -> bool,
        open_sockets: &dyn Fn() -> HashSet<u32>,
    ) {
        self.owners.retain(|ino, _| live.contains(ino));
        self.misses.retain(|ino, _| live.contains(ino));
        self.put_off.retain(|ino, _| live.contains(ino));
        self.forget_gone(procs);
        let wanted: HashSet<u32> = live
            .iter()
            .copied()
            .filter(|ino| {
                *ino != 0 && !self.owners.contains_key(ino) && !self.missed_lately(*ino, now)
            })
            .collect();
        cache::SOCKET_OWNER.misses(wanted.len() as u64);
        cache::SOCKET_OWNER.hits(live.len().saturating_sub(wanted.len()) as u64);
        cache::SOCKET_OWNER.entries(self.owners.len() + self.misses.len() + self.put_off.len());
        if wanted.is_empty() {
            return;
        }
        self.search(wanted, live, now, procs, still_open, open_sockets);
    }

    /// Between two samples (an owner glance): find the owners of the sockets of `seen` (the
    /// glance's dump: TCP only, some namespaces only) not known yet, forgetting no owner but
    /// those that exited (the next sample needs no search for the sockets the glance did not
    /// dump). Only the sockets of `seen` count as live for the search: a remembered descriptor
    /// of a socket the glance did not see is read again (it may have closed, and its number
    /// been reused by the very connection looked for), which costs a link read, not a miss.
    pub fn glance(
        &mut self,
        seen: &HashSet<u32>,
        now: Instant,
        procs: Option<&HashMap<u32, Gen>>,
        still_open: &mut dyn FnMut(u32) -> bool,
        open_sockets: &dyn Fn() -> HashSet<u32>,
    ) {
        self.forget_gone(procs);
        let wanted: HashSet<u32> = seen
            .iter()
            .copied()
            .filter(|ino| {
                *ino != 0 && !self.owners.contains_key(ino) && !self.missed_lately(*ino, now)
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        self.search(wanted, seen, now, procs, still_open, open_sockets);
    }

    /// Whether `ino` was searched for in vain less than its wait ago.
    fn missed_lately(&self, ino: u32, now: Instant) -> bool {
        self.misses
            .get(&ino)
            .is_some_and(|(at, wait)| now.saturating_duration_since(*at) < *wait)
            || self.put_off.get(&ino).is_some_and(|until| now < *until)
    }

    /// Drop the walks and owners of processes that left (or were born again).
    fn forget_gone(&mut self, procs: Option<&HashMap<u32, Gen>>) {
        if let Some(p) = procs {
            // Processes that left or were born again: their walk is stale.
            self.fds
                .retain(|pid, w| p.get(pid).is_some_and(|g| w.generation == Some(*g)));
        }
        let owner_pids: HashSet<u32> = self.owners.values().copied().collect();
        let gone: HashSet<u32> = owner_pids
            .iter()
            .copied()
            .filter(|pid| match procs {
                Some(p) => !p.contains_key(pid),
                None => !self.proc_root.join(pid.to_string()).exists(),
            })
            .collect();
        if !gone.is_empty() {
            self.owners.retain(|_, pid| !gone.contains(pid));
            self.fds.retain(|pid, _| !gone.contains(pid));
        }
    }

    /// Look for the owners of `wanted` (see [`OwnerCache::refresh`] for the order); `live`:
    /// the sockets known to be open.
    fn search(
        &mut self,
        mut wanted: HashSet<u32>,
        live: &HashSet<u32>,
        now: Instant,
        procs: Option<&HashMap<u32, Gen>>,
        still_open: &mut dyn FnMut(u32) -> bool,
        open_sockets: &dyn Fn() -> HashSet<u32>,
    ) {
        let started = Instant::now();
        self.stats.walks += 1;
        // Busiest owners first: a server with many sockets is the likeliest to have new ones.
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for pid in self.owners.values() {
            *counts.entry(*pid).or_default() += 1;
        }
        let mut first: Vec<(usize, u32)> = counts.into_iter().map(|(p, c)| (c, p)).collect();
        first.sort_unstable_by(|a, b| b.cmp(a));
        let first: Vec<u32> = first.into_iter().map(|(_, p)| p).collect();
        let mut skipped = Vec::new();
        for &pid in &first {
            let generation = procs.and_then(|p| p.get(&pid).copied());
            if !self.walk_pid(pid, generation, false, live, None, &mut wanted) {
                skipped.push((pid, generation));
            }
            if wanted.is_empty() {
                self.stats.last_walk = started.elapsed();
                return;
            }
        }
        let walked: HashSet<u32> = first.into_iter().collect();
        // The owners passed over are listed at once when a socket is found nowhere else (a
        // busy server opens and closes files and sockets all the time: its count says little,
        // and the bytes of a socket's first sample go to the owner known then); only the
        // listing of every other process is put off.
        let skipped_owners = std::mem::take(&mut skipped);
        // Not among the owners: before every other process is looked at (a `stat` each at
        // least), ask whether the socket still has a descriptor at all: one closed since the
        // dump (a short connection, a local scrape) has no owner left to find.
        wanted.retain(|ino| still_open(*ino));
        if wanted.is_empty() {
            self.stats.last_walk = started.elapsed();
            return;
        }
        // Every other process: those born since the previous search first.
        let others: Vec<(u32, Option<Gen>)> = match procs {
            Some(procs) => {
                let seen = self.born_seen;
                let mut v: Vec<(bool, u64, u32)> = procs
                    .iter()
                    .filter(|(p, _)| !walked.contains(p))
                    .map(|(p, g)| (g.born <= seen, g.born, *p))
                    .collect();
                v.sort_unstable();
                self.born_seen = v.iter().map(|(_, b, _)| *b).max().unwrap_or(0).max(seen);
                v.into_iter()
                    .map(|(_, _, p)| (p, procs.get(&p).copied()))
                    .collect()
            }
            None => {
                let mut v: Vec<(u32, Option<Gen>)> = match fs::read_dir(&self.proc_root) {
                    Ok(dir) => dir
                        .flatten()
                        .filter_map(|e| {
                            std::str::from_utf8(e.file_name().as_bytes())
                                .ok()
                                .and_then(|s| s.parse::<u32>().ok())
                        })
                        .filter(|p| !walked.contains(p))
                        .map(|p| (p, None))
                        .collect(),
                    Err(_) => Vec::new(),
                };
                // Without a table, the listing bounds the walks kept.
                let listed: HashSet<u32> = v.iter().map(|(p, _)| *p).collect();
                self.fds
                    .retain(|p, _| listed.contains(p) || walked.contains(p));
                v.sort_unstable_by_key(|(p, _)| *p);
                v
            }
        };
        for (pid, generation) in others {
            if !self.walk_pid(pid, generation, false, live, None, &mut wanted) {
                skipped.push((pid, generation));
            }
            if wanted.is_empty() {
                break;
            }
        }
        for (pid, generation) in skipped_owners {
            if wanted.is_empty() {
                self.stats.last_walk = started.elapsed();
                return;
            }
            self.walk_pid(pid, generation, true, live, None, &mut wanted);
        }
        // Not found: a process skipped for its unchanged count closed a file and opened the
        // socket: list those too — the last listing, the most expensive step. Only for a
        // socket missed at a previous search already (one not found at once is most often
        // closing: a short connection; it is asked about again first), and within the
        // listing budget; the others wait (`put_off`), searched again at the next sample.
        if !skipped.is_empty() && !wanted.is_empty() {
            let (ready, first): (HashSet<u32>, HashSet<u32>) = wanted
                .drain()
                .partition(|ino| self.put_off.contains_key(ino) || self.misses.contains_key(ino));
            let put_off_now = !first.is_empty();
            for ino in first {
                self.put_off.insert(ino, now);
            }
            // Asked about again: one closed during the walk has nothing left to find.
            let mut ready: HashSet<u32> = ready
                .into_iter()
                .filter(|ino| {
                    let open = still_open(*ino);
                    if !open {
                        self.put_off.remove(ino);
                    }
                    open
                })
                .collect();
            if !ready.is_empty() && !self.listing.allows(now) {
                for ino in ready.drain() {
                    self.put_off.insert(ino, now + LISTING_RETRY);
                }
                cache::OWNER_LISTINGS.hit();
                self.stats.listings_put_off += 1;
            } else if ready.is_empty() && put_off_now {
                cache::OWNER_LISTINGS.hit();
                self.stats.listings_put_off += 1;
            }
            if ready.is_empty() {
                self.stats.last_walk = started.elapsed();
                return;
            }
            cache::OWNER_LISTINGS.miss();
            self.stats.listings += 1;
            let cpu = thread_cpu();
            wanted = ready;
            let open = open_sockets();
            for (pid, generation) in skipped {
                if wanted.is_empty() {
                    break;
                }
                self.walk_pid(pid, generation, true, live, Some(&open), &mut wanted);
            }
            self.listing.spend(thread_cpu().saturating_sub(cpu));
        }
        for ino in wanted {
            self.put_off.remove(&ino);
            let wait = self
                .misses
                .get(&ino)
                .map_or(MISS_RETRY, |(_, w)| w.saturating_mul(2).min(MISS_RETRY_MAX));
            self.misses.insert(ino, (now, wait));
        }
        self.stats.last_walk = started.elapsed();
    }

    /// Read `pid`'s socket descriptors, unless (`all` false) it has as many descriptors as
    /// at its previous walk and every socket it held then is still live (a closed socket's
    /// descriptor number may hold a new one). False when skipped so. With `open` (every socket
    /// open now), a descriptor that held another socket (not wanted) that is still open is
    /// not read again.
    fn walk_pid(
        &mut self,
        pid: u32,
        generation: Option<Gen>,
        all: bool,
        live: &HashSet<u32>,
        open: Option<&HashSet<u32>>,
        wanted: &mut HashSet<u32>,
    ) -> bool {
        let dir = self.proc_root.join(pid.to_string()).join("fd");
        let old = self.fds.remove(&pid);
        if !all
            && let Some(w) = &old
            && w.count > 0
            && w.socks.iter().all(|(_, ino)| live.contains(ino))
            && fs::metadata(&dir).is_ok_and(|m| m.len() == w.count)
        {
            cache::SOCKET_OWNER_WALK.hit();
            self.stats.pids_passed += 1;
            if let Some(w) = old {
                self.fds.insert(pid, w);
            }
            return false;
        }
        cache::SOCKET_OWNER_WALK.miss();
        // Links are read relative to the open `fd/` (`readlinkat`), not by a path walk of
        // `/proc/<pid>/fd/<n>` each, as the weights scan and the training sampler read them.
        use rustix::fs::{Mode, OFlags};
        let Ok(fd_dir) = rustix::fs::open(
            &dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return true;
        };
        // A listing's process whose table looks unchanged: read at its remembered descriptors.
        if all
            && let (Some(open), Some(w)) = (open, &old)
            && let Some(again) = self.reread(&fd_dir, w, live, open)
        {
            self.stats.pids_reread += 1;
            for &(_, inode) in &again.socks {
                self.claim(pid, inode, wanted);
            }
            self.fds.insert(
                pid,
                Walked {
                    generation,
                    ..again
                },
            );
            return true;
        }
        let Ok(entries) = rustix::fs::Dir::read_from(&fd_dir) else {
            return true;
        };
        self.stats.pids_walked += 1;
        let mut link = Vec::with_capacity(64);
        let mut files: Option<Vec<u32>> = Some(Vec::new());
        let old_socks: &[(u32, u32)] = old.as_ref().map_or(&[], |w| &w.socks);
        let old_others: &[(u32, u32)] = old.as_ref().map_or(&[], |w| &w.others);
        let mut socks: Vec<(u32, u32)> = Vec::new();
        let mut others: Vec<(u32, u32)> = Vec::new();
        let mut count = 0u64;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(fd) = std::str::from_utf8(name.to_bytes())
                .ok()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            count += 1;
            let remembered = old_socks
                .binary_search_by_key(&fd, |(f, _)| *f)
                .ok()
                .map(|i| old_socks[i].1);
            let other = || {
                let i = old_others.binary_search_by_key(&fd, |(f, _)| *f).ok()?;
                let ino = old_others[i].1;
                open.is_some_and(|o| o.contains(&ino)).then_some(ino)
            };
            let inode = match remembered {
                Some(ino) if live.contains(&ino) => ino,
                _ => {
                    if let Some(ino) = other() {
                        others.push((fd, ino));
                        continue;
                    }
                    self.stats.links_read += 1;
                    match read_socket_link(&fd_dir, name, &mut link) {
                        Ok(Some(ino)) if live.contains(&ino) => ino,
                        Ok(Some(ino)) => {
                            others.push((fd, ino));
                            continue;
                        }
                        Ok(None) => {
                            if let Some(f) = &mut files {
                                f.push(fd);
                            }
                            continue;
                        }
                        // Closed since the listing: what this walk remembers is not the whole
                        // table.
                        Err(Gone) => {
                            files = None;
                            continue;
                        }
                    }
                }
            };
            socks.push((fd, inode));
            self.claim(pid, inode, wanted);
        }
        socks.sort_unstable();
        others.sort_unstable();
        let files = files
            .filter(|f| f.len() <= FILES_MAX)
            .map(Vec::into_boxed_slice);
        self.fds.insert(
            pid,
            Walked {
                generation,
                count,
                socks: socks.into_boxed_slice(),
                others: others.into_boxed_slice(),
                files,
            },
        );
        true
    }

    /// `inode` is held by `pid`: its owner unless one was found before.
    fn claim(&mut self, pid: u32, inode: u32, wanted: &mut HashSet<u32>) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.owners.entry(inode) {
            e.insert(pid);
            self.misses.remove(&inode);
            self.put_off.remove(&inode);
            wanted.remove(&inode);
        }
    }

    /// A listing's read of a process (`fd_dir`, its open `fd/`) that has as many descriptors as
    /// at its previous walk `old`, which remembered every one of them: only the descriptors
    /// that held something other than a socket then, and those whose socket has closed since
    /// (not in `open`), are read again, without listing `fd/`. With the count unchanged, a new
    /// socket took the place of a descriptor that closed; a closed non-socket descriptor reads
    /// as gone (`None`: `fd/` is then listed), a reused one reads as the socket. What is not
    /// seen so: a descriptor of a socket still open through a duplicate (inherited, passed)
    /// closed, and the new socket given another number — found once that socket closes, or
    /// the count changes. On a node of pods this is most of a listing: each pod's hundreds of
    /// connection descriptors were listed (`getdents` of `fd/`, half of a listing's time in
    /// `bench_footprint`'s node of pods) for the three or four descriptors read.
    fn reread(
        &mut self,
        fd_dir: &rustix::fd::OwnedFd,
        old: &Walked,
        live: &HashSet<u32>,
        open: &HashSet<u32>,
    ) -> Option<Walked> {
        let files = old.files.as_deref()?;
        let remembered = old.socks.len() + old.others.len() + files.len();
        if old.count == 0 || u64::try_from(remembered).ok()? != old.count {
            return None;
        }
        let size = rustix::fs::fstat(fd_dir).ok()?.st_size;
        if u64::try_from(size).ok()? != old.count {
            return None;
        }
        let mut socks = Vec::with_capacity(old.socks.len());
        let mut others = Vec::with_capacity(old.others.len());
        let mut new_files = Vec::with_capacity(files.len());
        let mut link = Vec::with_capacity(64);
        let mut name = String::with_capacity(12);
        let mut read = |fd: u32, stats: &mut WalkStats| -> Result<Option<u32>, Gone> {
            use std::fmt::Write as _;
            name.clear();
            let _ = write!(name, "{fd}");
            stats.links_read += 1;
            read_socket_link(fd_dir, name.as_str(), &mut link)
        };
        let mut place = |fd: u32, found: Option<u32>| match found {
            Some(ino) if live.contains(&ino) => socks.push((fd, ino)),
            Some(ino) => others.push((fd, ino)),
            None => new_files.push(fd),
        };
        for &(fd, ino) in &old.socks {
            if live.contains(&ino) {
                place(fd, Some(ino));
            } else {
                place(fd, read(fd, &mut self.stats).ok()?);
            }
        }
        for &(fd, ino) in &old.others {
            if open.contains(&ino) {
                place(fd, Some(ino));
            } else {
                place(fd, read(fd, &mut self.stats).ok()?);
            }
        }
        for &fd in files {
            place(fd, read(fd, &mut self.stats).ok()?);
        }
        socks.sort_unstable();
        others.sort_unstable();
        new_files.sort_unstable();
        Some(Walked {
            generation: old.generation,
            count: old.count,
            socks: socks.into_boxed_slice(),
            others: others.into_boxed_slice(),
            files: Some(new_files.into_boxed_slice()),
        })
    }
}

/// A descriptor that is no longer there (closed since its process was listed).
#[derive(Debug)]
struct Gone;

/// The socket inode descriptor `name` of the open `fd/` holds (`None`: not a socket, or a link
/// that cannot be read, such as another user namespace's process); `Gone` when the descriptor
/// is closed. `buf` is reused across reads.
fn read_socket_link<P: rustix::path::Arg>(
    fd_dir: &rustix::fd::OwnedFd,
    name: P,
    buf: &mut Vec<u8>,
) -> Result<Option<u32>, Gone> {
    match rustix::fs::readlinkat(fd_dir, name, std::mem::take(buf)) {
        Ok(target) => {
            let parsed = parse_socket_link(target.as_bytes());
            *buf = target.into_bytes();
            Ok(parsed)
        }
        Err(rustix::io::Errno::NOENT) => Err(Gone),
        Err(_) => Ok(None),
    }
}

/// The inode of a `socket:[12345]` link target.
pub fn parse_socket_link(target: &[u8]) -> Option<u32> {
    let inner = target.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(inner).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fake_fd(root: &Path, pid: u32, fd: u32, target: &str) {
        let dir = root.join(pid.to_string()).join("fd");
        fs::create_dir_all(&dir).unwrap();
        symlink(target, dir.join(fd.to_string())).unwrap();
    }

    #[test]
    fn socket_link_targets_are_parsed_and_other_links_are_not() {
        assert_eq!(parse_socket_link(b"socket:[12345]"), Some(12345));
        assert_eq!(parse_socket_link(b"pipe:[12345]"), None);
        assert_eq!(parse_socket_link(b"/dev/null"), None);
        assert_eq!(parse_socket_link(b"socket:[]"), None);
    }

    #[test]
    fn an_inode_in_no_fd_directory_has_no_owner_and_is_not_searched_again_at_once() {
        let root = tempfile::tempdir().unwrap();
        fake_fd(root.path(), 100, 3, "socket:[5000]");
        fake_fd(root.path(), 100, 4, "/dev/null");
        fake_fd(root.path(), 200, 0, "pipe:[77]");
        fs::create_dir_all(root.path().join("self")).unwrap();
        let mut cache = OwnerCache::new(root.path());
        let live: HashSet<u32> = [5000, 6000].into();
        let t0 = Instant::now();
        cache.refresh(&live, t0, None, &mut |_| true, &HashSet::new);
        assert_eq!(cache.owner(5000), Some(100));
        assert_eq!(cache.owner(6000), None, "no process holds inode 6000");
        assert_eq!(cache.stats().walks, 1);

        // Same sockets: the miss is remembered, nothing is read.
        cache.refresh(
            &live,
            t0 + Duration::from_secs(5),
            None,
            &mut |_| true,
            &HashSet::new,
        );
        assert_eq!(cache.stats().walks, 1, "no walk when every inode is known");

        // After MISS_RETRY the miss is looked for again (and found once it appears).
        fake_fd(root.path(), 300, 9, "socket:[6000]");
        cache.refresh(
            &live,
            t0 + MISS_RETRY + Duration::from_secs(1),
            None,
            &mut |_| true,
            &HashSet::new,
        );
        assert_eq!(cache.stats().walks, 2);
        assert_eq!(cache.owner(6000), Some(300));
    }

    #[test]
    fn an_inode_never_found_is_searched_for_less_and_less_often() {
        let root = tempfile::tempdir().unwrap();
        fake_fd(root.path(), 100, 3, "/dev/null");
        let mut cache = OwnerCache::new(root.path());
        let live: HashSet<u32> = [7000].into();
        let t0 = Instant::now();
        let mut at = t0;
        let mut searches = Vec::new();
        // Three hours of samples every 10 s: searched at 0, then after 1, 2, 4, 8, 16, 30, 30…
        // minutes.
        while at < t0 + Duration::from_secs(3 * 3600) {
            let before = cache.stats().walks;
            cache.refresh(&live, at, None, &mut |_| true, &HashSet::new);
            if cache.stats().walks > before {
                searches.push(at.duration_since(t0).as_secs() / 60);
            }
            at += Duration::from_secs(10);
        }
        assert_eq!(
            searches,
            vec![0, 1, 3, 7, 15, 31, 61, 91, 121, 151],
            "minutes after the start"
        );
        // Found at last (a process received it): its owner, and no more waiting.
        fake_fd(root.path(), 200, 4, "socket:[7000]");
        cache.refresh(
            &live,
            at + MISS_RETRY_MAX,
            None,
            &mut |_| true,
            &HashSet::new,
        );
        assert_eq!(cache.owner(7000), Some(200));
    }

    #[test]
    fn a_new_socket_of_a_known_owner_costs_one_link_read() {
        let root = tempfile::tempdir().unwrap();
        fake_fd(root.path(), 10, 3, "socket:[1]");
        fake_fd(root.path(), 20, 3, "socket:[2]");
        let mut cache = OwnerCache::new(root.path());
        let t = Instant::now();
        cache.refresh(&[1, 2].into(), t, None, &mut |_| true, &HashSet::new);
        let before = cache.stats();
        assert_eq!(before.links_read, 2);

        fake_fd(root.path(), 10, 4, "socket:[3]");
        cache.refresh(&[1, 2, 3].into(), t, None, &mut |_| true, &HashSet::new);
        let after = cache.stats();
        assert_eq!(cache.owner(3), Some(10));
        // pid 10's fd 3 is remembered (socket 1 still live): only fd 4 was read.
        assert_eq!(after.links_read - before.links_read, 1);
        assert_eq!(after.walks, 2);
    }

    #[test]
    fn a_socket_closed_since_its_dump_costs_no_walk_beyond_the_known_owners() {
        let root = tempfile::tempdir().unwrap();
        fake_fd(root.path(), 10, 3, "socket:[1]");
        for pid in [20, 30, 40] {
            fake_fd(root.path(), pid, 0, "/dev/null");
        }
        let mut cache = OwnerCache::new(root.path());
        let t = Instant::now();
        cache.refresh(&[1].into(), t, None, &mut |_| true, &HashSet::new);
        assert_eq!(cache.owner(1), Some(10));
        let before = cache.stats();
        // Socket 99 was in the dump but closed before the search (a local scrape).
        let mut asked = Vec::new();
        cache.refresh(
            &[1, 99].into(),
            t,
            None,
            &mut |ino| {
                asked.push(ino);
                false
            },
            &HashSet::new,
        );
        assert_eq!(asked, vec![99], "asked once, exactly");
        let after = cache.stats();
        assert!(
            after.pids_walked - before.pids_walked <= 1,
            "only the known owner looked at, not every process: {before:?} {after:?}"
        );
        assert_eq!(cache.owner(99), None);
    }

    #[test]
    fn a_glance_finds_new_owners_and_forgets_none_of_the_sockets_it_did_not_dump() {
        let root = tempfile::tempdir().unwrap();
        // 1: a UDP socket of pid 10; 2: a TCP connection of pid 20.
        fake_fd(root.path(), 10, 3, "socket:[1]");
        fake_fd(root.path(), 20, 3, "socket:[2]");
        let mut cache = OwnerCache::new(root.path());
        let t = Instant::now();
        cache.refresh(&[1, 2].into(), t, None, &mut |_| true, &HashSet::new);
        let walks = cache.stats().walks;
        // pid 30 opens connection 3; a glance dumps TCP only: it sees 2 and 3, not 1.
        fake_fd(root.path(), 30, 4, "socket:[3]");
        cache.glance(&[2, 3].into(), t, None, &mut |_| true, &HashSet::new);
        assert_eq!(cache.owner(3), Some(30));
        assert_eq!(cache.owner(1), Some(10), "the UDP socket's owner is kept");
        assert_eq!(cache.stats().walks, walks + 1);
        // The next sample sees all three: nothing to search.
        cache.refresh(&[1, 2, 3].into(), t, None, &mut |_| true, &HashSet::new);
        assert_eq!(cache.stats().walks, walks + 1, "no walk: every owner known");
        // A glance with nothing new reads nothing.
        cache.glance(&[2, 3].into(), t, None, &mut |_| true, &HashSet::new);
        assert_eq!(cache.stats().walks, walks + 1);
        // Connection 3 closes and its descriptor number is reused by connection 5 (a quick
        // uploader's next connection) before any sample: the glance reads the link again.
        fs::remove_file(root.path().join("30").join("fd").join("4")).unwrap();
        fake_fd(root.path(), 30, 4, "socket:[5]");
        cache.glance(&[2, 5].into(), t, None, &mut |_| true, &HashSet::new);
        assert_eq!(
            cache.owner(5),
            Some(30),
            "not hidden behind the closed socket 3"
        );
    }

    #[test]
    fn a_listing_reads_again_only_descriptors_whose_other_sockets_closed() {
        let root = tempfile::tempdir().unwrap();
        // pid 10: a pod's process, two loopback connections (7 and 8, not wanted) and a
        // listener (1, wanted).
        fake_fd(root.path(), 10, 3, "socket:[7]");
        fake_fd(root.path(), 10, 4, "socket:[8]");
        fake_fd(root.path(), 10, 5, "socket:[1]");
        let mut cache = OwnerCache::new(root.path());
        let live: HashSet<u32> = [1].into();
        let mut wanted: HashSet<u32> = [1].into();
        assert!(cache.walk_pid(10, None, true, &live, None, &mut wanted));
        assert_eq!(cache.owner(1), Some(10));
        let read = cache.stats().links_read;
        assert_eq!(read, 3, "every link read at first");
        // A listing while 7 and 8 are open: no link read again.
        let open: HashSet<u32> = [1, 7, 8].into();
        cache.walk_pid(10, None, true, &live, Some(&open), &mut HashSet::new());
        assert_eq!(cache.stats().links_read, read, "nothing read again");
        // 7 closed and its descriptor now holds connection 9, which is wanted: read again.
        fs::remove_file(root.path().join("10").join("fd").join("3")).unwrap();
        fake_fd(root.path(), 10, 3, "socket:[9]");
        let live: HashSet<u32> = [1, 9].into();
        let open: HashSet<u32> = [1, 8, 9].into();
        let mut wanted: HashSet<u32> = [9].into();
        cache.walk_pid(10, None, true, &live, Some(&open), &mut wanted);
        assert_eq!(cache.owner(9), Some(10), "found behind the closed socket 7");
        assert_eq!(
            cache.stats().links_read,
            read + 1,
            "only that descriptor read"
        );
        // Without the open sockets (a walk that is not a listing), every other link is read.
        cache.walk_pid(10, None, true, &live, None, &mut HashSet::new());
        assert_eq!(cache.stats().links_read, read + 2);
    }

    #[test]
    fn an_owner_whose_process_is_gone_is_forgotten() {
        let root = tempfile::tempdir().unwrap();
        fake_fd(root.path(), 10, 3, "socket:[1]");
        let mut cache = OwnerCache::new(root.path());
        let t = Instant::now();
        cache.refresh(&[1].into(), t, None, &mut |_| true, &HashSet::new);
        assert_eq!(cache.owner(1), Some(10));
        fs::remove_dir_all(root.path().join("10")).unwrap();
        fake_fd(root.path(), 11, 5, "socket:[1]");
        cache.refresh(&[1].into(), t, None, &mut |_| true, &HashSet::new);
        assert_eq!(
            cache.owner(1),
            Some(11),
            "inherited by the child that still holds it"
        );
    }

    /// A child process killed and reaped when the test ends, however it ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// `python3 -c script port` with piped stdin and stdout, killed when the test ends, and
    /// its output; `None` (the skip recorded as `test`) without python3.
    fn python_child(
        script: &str,
        port: u16,
        test: &str,
    ) -> Option<(Kill, std::io::BufReader<std::process::ChildStdout>)> {
        use std::process::{Command, Stdio};
        let Ok(child) = Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
        else {
            crate::skipped::record(test, "no python3");
            return None;
        };
        let mut child = Kill(child);
        let out = std::io::BufReader::new(child.0.stdout.take().unwrap());
        Some((child, out))
    }

    /// The socket inodes `pid` holds now (read straight from `/proc`).
    fn sockets_of(pid: u32) -> Vec<u32> {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| fs::read_link(e.path()).ok())
                    .filter_map(|t| parse_socket_link(t.as_os_str().as_bytes()))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_process_that_swaps_a_file_for_a_socket_keeps_its_count_and_is_still_found() {
        use std::io::{BufRead, Write};
        // Holds a file open; on "go" closes it and connects (the same number of descriptors).
        const SWAP: &str = "import socket,sys\n\
            f=open('/etc/hostname','rb')\n\
            print('ready',flush=True)\n\
            sys.stdin.readline()\n\
            f.close()\n\
            s=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n\
            print('done',flush=True)\n\
            sys.stdin.readline()\n";
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let Some((mut child, mut out)) = python_child(
            SWAP,
            port,
            "collect::net::owners::a_process_that_swaps_a_file_for_a_socket",
        ) else {
            return;
        };
        let pid = child.0.id();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        let table = crate::collect::proctable::ProcTable::new(Path::new("/proc"));
        let mut cache = OwnerCache::new(Path::new("/proc"));
        let me = sockets_of(std::process::id());
        // Every process walked once: an inode nobody holds is looked for everywhere.
        let mut live: HashSet<u32> = me.iter().copied().collect();
        live.insert(u32::MAX - 7);
        cache.refresh(
            &live,
            Instant::now(),
            Some(&table.refresh(Duration::ZERO)),
            &mut |_| true,
            &HashSet::new,
        );
        // Only the listener's own socket is asserted: other tests of this process open and
        // close sockets between `sockets_of` and the search.
        let listener = {
            use std::os::fd::AsRawFd;
            let link = fs::read_link(format!("/proc/self/fd/{}", l.as_raw_fd())).unwrap();
            parse_socket_link(link.as_os_str().as_bytes()).unwrap()
        };
        assert!(me.contains(&listener));
        assert_eq!(cache.owner(listener), Some(std::process::id()));

        writeln!(child.0.stdin.as_mut().unwrap(), "go").unwrap();
        line.clear();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "done");
        let (accepted, _) = l.accept().unwrap();
        let theirs = sockets_of(pid);
        assert_eq!(theirs.len(), 1, "the child holds one socket");
        let mut live: HashSet<u32> = sockets_of(std::process::id()).into_iter().collect();
        live.insert(theirs[0]);
        let before = cache.stats();
        // Asked about as the kernel would answer (other tests of this process open and close
        // sockets meanwhile).
        let child_socket = theirs[0];
        let mut open =
            |ino: u32| ino == child_socket || sockets_of(std::process::id()).contains(&ino);
        // The first search passes over the processes whose count is unchanged and puts the
        // last listing off (a socket not found at once is most often closing); the next one
        // lists them.
        cache.refresh(
            &live,
            Instant::now(),
            Some(&table.refresh(Duration::ZERO)),
            &mut open,
            &HashSet::new,
        );
        assert_eq!(cache.owner(theirs[0]), None, "not listed at once");
        // A sample where the socket is gone (a short connection): no listing at all.
        let mut without = live.clone();
        without.remove(&theirs[0]);
        cache.refresh(
            &without,
            Instant::now(),
            Some(&table.refresh(Duration::ZERO)),
            &mut open,
            &HashSet::new,
        );
        assert!(
            !cache.put_off.contains_key(&theirs[0]),
            "forgotten with its socket: nothing to list for it"
        );
        // Put off again when it comes back, then listed at the search after.
        for _ in 0..2 {
            cache.refresh(
                &live,
                Instant::now(),
                Some(&table.refresh(Duration::ZERO)),
                &mut open,
                &HashSet::new,
            );
        }
        assert_eq!(cache.owner(u32::MAX - 7), None);
        assert_eq!(
            cache.owner(theirs[0]),
            Some(pid),
            "found although its descriptor count did not change"
        );
        let after = cache.stats();
        assert!(
            after.listings_put_off >= before.listings_put_off + 2
                && after.listings > before.listings,
            "put off twice, then listed: {before:?} {after:?}"
        );
        assert!(
            after.pids_passed > before.pids_passed,
            "unchanged processes were passed over first: {after:?}"
        );
        drop(accepted);
    }

    #[test]
    fn a_listing_reads_an_unchanged_process_at_its_remembered_descriptors_only() {
        use std::io::{BufRead, Write};
        // Two files and twenty socket pairs (a pod's other sockets); on each line, one file is
        // swapped for a connection: first at the file's own number, then at another one.
        const POD: &str = "import socket,sys,os\n\
            a=open('/etc/hostname','rb'); b=open('/etc/hostname','rb')\n\
            pairs=[socket.socketpair() for _ in range(20)]\n\
            print('ready',flush=True)\n\
            sys.stdin.readline()\n\
            a.close(); s=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n\
            print('swapped',flush=True)\n\
            sys.stdin.readline()\n\
            b.close(); t=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n\
            os.dup2(t.fileno(),100); t.close()\n\
            print('moved',flush=True)\n\
            sys.stdin.readline()\n";
        if fs::metadata("/proc/self/fd").map_or(0, |m| m.len()) == 0 {
            crate::skipped::record(
                "collect::net::owners::a_listing_reads_an_unchanged_process_at_its_remembered_descriptors_only",
                "this kernel does not count descriptors in the size of /proc/<pid>/fd (Linux 6.2+)",
            );
            return;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let Some((mut child, mut out)) = python_child(
            POD,
            port,
            "collect::net::owners::a_listing_reads_an_unchanged_process_at_its_remembered_descriptors_only",
        ) else {
            return;
        };
        let pid = child.0.id();
        let mut step = |say: &str, expect: &str| {
            if !say.is_empty() {
                writeln!(child.0.stdin.as_mut().unwrap(), "{say}").unwrap();
            }
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), expect);
        };
        step("", "ready");
        let pairs: HashSet<u32> = sockets_of(pid).into_iter().collect();
        assert_eq!(pairs.len(), 40);
        let not_sockets = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() - 40;
        let mut cache = OwnerCache::new(Path::new("/proc"));
        // A walk: every descriptor read once.
        assert!(cache.walk_pid(pid, None, true, &HashSet::new(), None, &mut HashSet::new()));
        let walked = cache.stats();
        assert_eq!(walked.pids_walked, 1);
        // A listing with the pairs known open: the files' descriptors only, `fd/` not listed.
        cache.walk_pid(
            pid,
            None,
            true,
            &HashSet::new(),
            Some(&pairs),
            &mut HashSet::new(),
        );
        let s = cache.stats();
        assert_eq!((s.pids_walked, s.pids_reread), (1, 1), "{s:?}");
        assert_eq!(s.links_read - walked.links_read, not_sockets as u64);

        // A file closed and a connection made in its place (the same count): found there.
        step("go", "swapped");
        let new: Vec<u32> = sockets_of(pid)
            .into_iter()
            .filter(|i| !pairs.contains(i))
            .collect();
        assert_eq!(new.len(), 1);
        let mut open = pairs.clone();
        open.extend(&new);
        let live: HashSet<u32> = new.iter().copied().collect();
        let mut wanted = live.clone();
        cache.walk_pid(pid, None, true, &live, Some(&open), &mut wanted);
        assert_eq!(cache.owner(new[0]), Some(pid));
        assert!(wanted.is_empty());
        let s = cache.stats();
        assert_eq!((s.pids_walked, s.pids_reread), (1, 2), "{s:?}");

        // The other file closed and a connection made at another number (the same count
        // again): its number reads as gone, so `fd/` is listed, and the connection found.
        step("go", "moved");
        let newer: Vec<u32> = sockets_of(pid)
            .into_iter()
            .filter(|i| !open.contains(i))
            .collect();
        assert_eq!(newer.len(), 1);
        open.extend(&newer);
        let mut live = live;
        live.extend(&newer);
        let mut wanted: HashSet<u32> = newer.iter().copied().collect();
        cache.walk_pid(pid, None, true, &live, Some(&open), &mut wanted);
        assert_eq!(cache.owner(newer[0]), Some(pid), "found at descriptor 100");
        let s = cache.stats();
        assert_eq!((s.pids_walked, s.pids_reread), (2, 2), "listed: {s:?}");
        drop(l);
    }

    #[test]
    fn this_process_owns_its_own_socket_on_the_real_proc() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let me = std::process::id();
        // This listener's own descriptor: other tests of this process open and close sockets
        // at the same time, so "the first socket descriptor" may be gone by the search.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        let inode = fs::read_link(format!("/proc/self/fd/{fd}"))
            .ok()
            .and_then(|t| parse_socket_link(t.as_os_str().as_bytes()));
        let Some(inode) = inode else {
            panic!("the listener is a socket descriptor of this process");
        };
        let mut cache = OwnerCache::new(Path::new("/proc"));
        cache.refresh(
            &[inode].into(),
            Instant::now(),
            None,
            &mut |_| true,
            &HashSet::new,
        );
        assert_eq!(cache.owner(inode), Some(me));
        drop(l);
    }
}
