//! Who uses each weight file: the processes that have it memory-mapped (`/proc/<pid>/maps`) or
//! open (`/proc/<pid>/fd/*`), so that a model can be linked to the GPUs those processes run on;
//! and, in the same pass ([`scan_processes`]), the files that processes use outside every weight
//! root, wherever they live (another mount namespace: a container image, a volume), each with a
//! handle the agent can open it through (`/proc/<pid>/map_files/<range>`, `/proc/<pid>/fd/<n>`).
//!
//! Files are matched by `(device, inode)`, never by path: a mapped path may read `(deleted)`, or
//! name a link, a bind mount or another mount namespace. The device column of `maps` (hex
//! `major:minor`) is encoded with [`super::storage::makedev`], the same number as
//! `MetadataExt::dev()`.
//!
//! Bounded: processes that vanish or refuse to be read are skipped, and at most
//! [`MAX_FDS_PER_PROCESS`] descriptors of one process are examined. Reading other users'
//! processes needs root (or `CAP_SYS_PTRACE` + `CAP_DAC_READ_SEARCH`); without it only the
//! agent's own user's processes are seen.
//!
//! Known limits:
//! - every open descriptor is `stat`ed through its `/proc` link, which follows to the file: a
//!   descriptor on a hung NFS mount can block that call (run the scan on a blocking thread);
//! - on overlayfs, `maps` shows the lower or upper layer's device and inode while `stat` through
//!   the overlay may show the overlay's, so a file mapped inside a container is found when the
//!   caller also asks for the layer file's `(device, inode)`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::storage::makedev;
use crate::collect::cache;
use crate::collect::namespaces;
use crate::collect::proctable::Gen;

/// At most this many descriptors of one process are examined.
pub const MAX_FDS_PER_PROCESS: usize = 65_536;

/// One process's use of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileUse {
    /// The process.
    pub pid: u32,
    /// The file appears in the process's memory maps.
    pub mapped: bool,
    /// The process holds a descriptor on the file.
    pub open: bool,
}

/// For the set of `(device, inode)` of known weight files, scans every `/proc/<pid>/maps` (by the
/// device and inode columns) and `/proc/<pid>/fd/*` (by `stat` of the descriptor, which follows
/// it to the open file), and returns the users of each file that has any, sorted by pid. Files
/// nobody uses are absent from the map.
pub fn scan_users(
    proc_root: &Path,
    wanted: &HashSet<(u64, u64)>,
) -> HashMap<(u64, u64), Vec<FileUse>> {
    if wanted.is_empty() {
        return HashMap::new();
    }
    scan_processes(proc_root, &|key| {
        if wanted.contains(&key) {
            Interest::User
        } else {
            Interest::Ignore
        }
    })
    .uses
}

/// What [`scan_processes`] should do with a file it meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Nothing (known not to be a weight file).
    Ignore,
    /// Record its users (a known weight file).
    User,
    /// Record its users and where it was first seen (a file to examine).
    Candidate,
}

/// Where a process was seen using a file, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    /// The process.
    pub pid: u32,
    /// The file's path as that process sees it (inside its mount namespace), without the
    /// kernel's ` (deleted)` mark.
    pub path: PathBuf,
    /// The file was deleted (only the process's mapping or descriptor keeps it).
    pub deleted: bool,
    /// A path the agent can open the very file through, whatever namespace it lives in:
    /// `/proc/<pid>/map_files/<start>-<end>` or `/proc/<pid>/fd/<n>`.
    pub handle: PathBuf,
    /// The handle is a descriptor (its `stat` gives the file as the process opened it: an
    /// overlay's device for a container's file), not a mapping (the layer file underneath).
    pub via_fd: bool,
}

/// What one pass over every process found.
#[derive(Debug, Default)]
pub struct ProcessFiles {
    /// Users of every file of interest, sorted by pid.
    pub uses: HashMap<(u64, u64), Vec<FileUse>>,
    /// The first sighting of every candidate file.
    pub sightings: HashMap<(u64, u64), Sighting>,
    /// Every file met (ignored ones included), for the caller's caches.
    pub seen: HashSet<(u64, u64)>,
    /// Processes examined, and those whose maps and descriptors could not be read.
    pub processes: usize,
    pub unreadable: usize,
}

/// One pass over every `/proc/<pid>/maps` and `/proc/<pid>/fd/*`: for each file that
/// `interest` wants, its users; for each candidate, where it was first seen. Descriptors on
/// anything but a path (sockets, pipes, `anon_inode:`) and on `/dev`, `/proc` and `/sys` are not
/// `stat`ed. (Everything read afresh: the scanner keeps a [`ProcessFilesCache`] instead.)
pub fn scan_processes(proc_root: &Path, interest: &dyn Fn((u64, u64)) -> Interest) -> ProcessFiles {
    let mut cache = ProcessFilesCache::new(proc_root);
    cache.refresh(None, true, &|_| true);
    cache.files(interest)
}

/// A process's files are read again after this many scans even when nothing says they changed
/// (a descriptor closed and another opened between two scans leaves the count unchanged).
pub const FULL_REREAD_SCANS: u32 = 5;
/// At most this many files of one process are remembered between scans (beyond, the process
/// is read again at every scan).
pub const MAX_KEPT_FILES: usize = 4096;

/// What one process maps and holds open, as read at its latest read.
#[derive(Debug, Clone)]
struct Held {
    generation: Option<Gen>,
    /// Virtual size (`statm`, pages) and descriptor count (`stat` of `fd/`, Linux 6.2+) when
    /// read: a new mapping or descriptor changes one of them.
    mark: Option<(u64, u64)>,
    mntns: Option<u64>,
    /// Every file met (device, inode).
    keys: Box<[(u64, u64)]>,
    /// How the files that were not known non-weights were met.
    kept: Box<[Met]>,
    /// Files met only through mappings too short for a weight file (below the cache's
    /// `min_mapped`, without a weight file's name): not remembered how, never a candidate
    /// through this process (sorted).
    small: Box<[(u64, u64)]>,
    readable: bool,
    /// Scans since it was read.
    age: u32,
}

/// One file met by one process.
#[derive(Debug, Clone)]
struct Met {
    key: (u64, u64),
    raw: Box<[u8]>,
    via: HeldVia,
}

/// How a process holds a file: a mapping's address range (its `map_files` name) or a
/// descriptor number.
#[derive(Debug, Clone, Copy)]
enum HeldVia {
    Map(u64, u64),
    Fd(u32),
}

/// The mapped and open files of every process, read once per process and again only when
/// its mappings or descriptors can have changed: a new process (or a pid born again, or an
/// exec seen by the process table), a change of its virtual size or of its number of
/// descriptors, or [`FULL_REREAD_SCANS`] scans later. Bounded: one entry per live process, at
/// most [`MAX_KEPT_FILES`] files each.
#[derive(Debug, Default)]
pub struct ProcessFilesCache {
    proc_root: PathBuf,
    procs: BTreeMap<u32, Held>,
    /// Mappings whose extent (file offset + length) is below this, of files without a weight
    /// file's name, are not remembered (shared libraries, locale archives): 0 keeps every one.
    min_mapped: u64,
    /// Reads and reuses so far.
    pub reads: u64,
    pub reuses: u64,
}

impl ProcessFilesCache {
    /// An empty cache over `proc_root`.
    pub fn new(proc_root: &Path) -> Self {
        Self {
            proc_root: proc_root.to_path_buf(),
            ..Self::default()
        }
    }

    /// Leave out mappings that reach less than `bytes` into their file (unless the file has a
    /// weight file's name): `[weights] process_min_file_bytes`, since a mapping's extent is a
    /// lower bound of its file's length. A file seen so is still a user's when it is a known
    /// weight file (the process is read again for it).
    pub fn set_min_mapped_bytes(&mut self, bytes: u64) {
        self.min_mapped = bytes;
    }

    /// Bring the cache up to date: `live` (the process table; `None`: list `proc_root`) says
    /// which processes exist; each is read again only when it may have changed. With
    /// `read_files` false only namespaces are read. `keep` says which files met are worth
    /// remembering how they were met (the ones not known to be non-weights).
    pub fn refresh(
        &mut self,
        live: Option<&HashMap<u32, Gen>>,
        read_files: bool,
        keep: &dyn Fn((u64, u64)) -> bool,
    ) {
        let pids: Vec<(u32, Option<Gen>)> = match live {
            Some(l) => l.iter().map(|(p, g)| (*p, Some(*g))).collect(),
            None => match fs::read_dir(&self.proc_root) {
                Ok(dir) => dir
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .map(|p| (p, None))
                    .collect(),
                Err(_) => {
                    tracing::warn!(proc_root = %self.proc_root.display(), "cannot list processes");
                    Vec::new()
                }
            },
        };
        let alive: HashSet<u32> = pids.iter().map(|(p, _)| *p).collect();
        self.procs.retain(|p, _| alive.contains(p));
        let mut line = String::new();
        let (mut reads, mut reuses) = (0u64, 0u64);
        for (pid, generation) in pids {
            let base = self.proc_root.join(pid.to_string());
            let mark = read_mark(&base);
            if let Some(h) = self.procs.get_mut(&pid)
                && h.generation == generation
                && mark.is_some()
                && h.mark == mark
                && h.age < FULL_REREAD_SCANS
                && (h.readable || !read_files)
            {
                h.age += 1;
                reuses += 1;
                continue;
            }
            reads += 1;
            let held = read_held(
                &base,
                generation,
                mark,
                read_files,
                keep,
                self.min_mapped,
                &mut line,
            );
            self.procs.insert(pid, held);
        }
        self.reads += reads;
        self.reuses += reuses;
        cache::PROCESS_FILES.misses(reads);
        cache::PROCESS_FILES.hits(reuses);
        cache::PROCESS_FILES.entries(self.procs.len());
    }

    /// Every mount namespace with its processes (sorted), as of the latest refresh.
    pub fn by_mnt(&self) -> HashMap<u64, Vec<u32>> {
        let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
        for (pid, h) in &self.procs {
            if let Some(ns) = h.mntns {
                out.entry(ns).or_default().push(*pid);
            }
        }
        out
    }

    /// The users of every file `interest` wants and the first sighting of every candidate,
    /// from the files as of the latest refresh (a process whose file became interesting since
    /// it was read is read again now).
    pub fn files(&mut self, interest: &dyn Fn((u64, u64)) -> Interest) -> ProcessFiles {
        let mut out = ProcessFiles {
            processes: self.procs.len(),
            ..ProcessFiles::default()
        };
        let mut line = String::new();
        let proc_root = self.proc_root.clone();
        for (&pid, held) in &mut self.procs {
            let base = proc_root.join(pid.to_string());
            let stale = held.keys.iter().any(|k| {
                let want = interest(*k);
                want != Interest::Ignore
                    && held.kept.binary_search_by_key(k, |m| m.key).is_err()
                    && (want == Interest::User || held.small.binary_search(k).is_err())
            });
            if stale {
                *held = read_held(
                    &base,
                    held.generation,
                    held.mark,
                    true,
                    &|_| true,
                    0,
                    &mut line,
                );
            }
            if !held.readable {
                out.unreadable += 1;
            }
            let mut uses: BTreeMap<(u64, u64), FileUse> = BTreeMap::new();
            for k in held.keys.iter() {
                out.seen.insert(*k);
            }
            for m in held.kept.iter() {
                let what = interest(m.key);
                if what == Interest::Ignore {
                    continue;
                }
                let u = uses.entry(m.key).or_insert(FileUse {
                    pid,
                    mapped: false,
                    open: false,
                });
                match m.via {
                    HeldVia::Map(..) => u.mapped = true,
                    HeldVia::Fd(_) => u.open = true,
                }
                if what == Interest::Candidate && !out.sightings.contains_key(&m.key) {
                    let (path, deleted) = undeleted(&m.raw);
                    let (handle, via_fd) = match m.via {
                        HeldVia::Map(start, end) => (
                            base.join("map_files").join(format!("{start:x}-{end:x}")),
                            false,
                        ),
                        HeldVia::Fd(fd) => (base.join("fd").join(fd.to_string()), true),
                    };
                    out.sightings.insert(
                        m.key,
                        Sighting {
                            pid,
                            path,
                            deleted,
                            handle,
                            via_fd,
                        },
                    );
                }
            }
            for (key, u) in uses {
                // Pids are visited in ascending order, so each list stays sorted.
                out.uses.entry(key).or_default().push(u);
            }
        }
        tracing::debug!(
            processes = out.processes,
            unreadable = out.unreadable,
            files_in_use = out.uses.len(),
            candidates = out.sightings.len(),
            "process files scanned"
        );
        out
    }
}

/// A process's virtual size (pages, first field of `statm`) and descriptor count (size of
/// its `fd` directory); `None` when either cannot be read.
fn read_mark(base: &Path) -> Option<(u64, u64)> {
    let statm = fs::read_to_string(base.join("statm")).ok()?;
    let vsize: u64 = statm.split_ascii_whitespace().next()?.parse().ok()?;
    let fds = fs::metadata(base.join("fd")).ok()?.len();
    Some((vsize, fds))
}

/// Read one process's mount namespace and (with `read_files`) its maps and descriptors;
/// mappings reaching less than `min_mapped` into a file without a weight file's name are
/// only listed as small.
fn read_held(
    base: &Path,
    generation: Option<Gen>,
    mark: Option<(u64, u64)>,
    read_files: bool,
    keep: &dyn Fn((u64, u64)) -> bool,
    min_mapped: u64,
    line: &mut String,
) -> Held {
    let mntns = {
        use std::os::unix::ffi::OsStrExt;
        fs::read_link(base.join("ns").join(namespaces::MNT))
            .ok()
            .and_then(|t| namespaces::parse_link(namespaces::MNT, t.as_os_str().as_bytes()))
    };
    let mut keys: Vec<(u64, u64)> = Vec::new();
    let mut kept: Vec<Met> = Vec::new();
    let mut small: Vec<(u64, u64)> = Vec::new();
    let mut readable = false;
    if read_files {
        let mut met = |key: (u64, u64), raw: &[u8], via: HeldVia| {
            keys.push(key);
            if keep(key) && kept.len() < MAX_KEPT_FILES {
                kept.push(Met {
                    key,
                    raw: raw.into(),
                    via,
                });
            }
        };
        let maps_ok = scan_maps(
            &base.join("maps"),
            line,
            |key, (start, end), extent, path| {
                if extent < min_mapped && !weight_name(path.as_bytes()) {
                    small.push(key);
                } else {
                    met(key, path.as_bytes(), HeldVia::Map(start, end));
                }
            },
        );
        let fds_ok = scan_fds(&base.join("fd"), |key, fd, target| {
            met(key, target, HeldVia::Fd(fd));
        });
        readable = maps_ok || fds_ok;
    }
    keys.extend_from_slice(&small);
    keys.sort_unstable();
    keys.dedup();
    keys.truncate(MAX_KEPT_FILES);
    // A file also mapped further, or held open, is remembered: not small.
    small.sort_unstable();
    small.dedup();
    small.retain(|k| !kept.iter().any(|m| m.key == *k));
    // Sorted by file (stable: each file's first sighting stays first) for lookups.
    kept.sort_by_key(|m| m.key);
    Held {
        generation,
        // Read again at the next scan when the whole list could not be kept.
        mark: if kept.len() >= MAX_KEPT_FILES {
            None
        } else {
            mark
        },
        mntns,
        keys: keys.into_boxed_slice(),
        kept: kept.into_boxed_slice(),
        small: small.into_boxed_slice(),
        readable,
        age: 0,
    }
}

/// A path's bytes without the kernel's ` (deleted)` mark.
fn undeleted_bytes(path: &[u8]) -> &[u8] {
    path.strip_suffix(b" (deleted)").unwrap_or(path)
}

/// A path without the kernel's ` (deleted)` mark, and whether it had it.
fn undeleted(path: &[u8]) -> (PathBuf, bool) {
    const MARK: &[u8] = b" (deleted)";
    match path.strip_suffix(MARK) {
        Some(p) => (PathBuf::from(OsStr::from_bytes(p)), true),
        None => (PathBuf::from(OsStr::from_bytes(path)), false),
    }
}

/// A file name that weights are stored under (then remembered however little of it is mapped).
fn weight_name(path: &[u8]) -> bool {
    super::inventory::sniff_rank(Path::new(OsStr::from_bytes(undeleted_bytes(path)))) == 0
}

/// Calls `hit(key, address range, extent, path)` for each file (once per run of consecutive
/// mappings of one file, with the run's largest extent: file offset + length). False when
/// `maps` could not be opened (the process is gone or not ours to read).
fn scan_maps(
    path: &Path,
    line: &mut String,
    mut hit: impl FnMut((u64, u64), (u64, u64), u64, &str),
) -> bool {
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    let mut reader = BufReader::new(file);
    // One file is usually several consecutive mappings: reported once, at the end of its run,
    // with the first mapping's range and path and the run's largest extent.
    struct Run {
        key: (u64, u64),
        range: (u64, u64),
        extent: u64,
        path: String,
    }
    let mut run: Option<Run> = None;
    loop {
        line.clear();
        match reader.read_line(line) {
            Ok(0) | Err(_) => break, // end, or the process exited mid-read
            Ok(_) => {}
        }
        let Some(m) = parse_maps_line(line) else {
            continue;
        };
        match &mut run {
            Some(r) if r.key == m.key => r.extent = r.extent.max(m.extent),
            _ => {
                if let Some(r) = run.take() {
                    hit(r.key, r.range, r.extent, &r.path);
                }
                run = Some(Run {
                    key: m.key,
                    range: m.range,
                    extent: m.extent,
                    path: m.path.to_owned(),
                });
            }
        }
    }
    if let Some(r) = run {
        hit(r.key, r.range, r.extent, &r.path);
    }
    true
}

/// One file mapping of a `maps` line.
#[derive(Debug, PartialEq, Eq)]
struct MapsLine<'a> {
    key: (u64, u64),
    /// Start and end address (the `map_files` name, `<start>-<end>` in lower-case hex).
    range: (u64, u64),
    /// File offset + length: how far into the file the mapping reaches.
    extent: u64,
    path: &'a str,
}

/// `(device, inode)`, address range, extent and path of one `maps` line
/// (`7f3a… r--s 00000000 fd:01 1234567   /models/x.safetensors`); `None` for anonymous mappings.
fn parse_maps_line(line: &str) -> Option<MapsLine<'_>> {
    let line = line.trim_end_matches('\n');
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let (start, end) = range.split_once('-')?;
    let (start, end) = (
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    );
    let _perms = fields.next()?;
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode: u64 = fields.next()?.parse().ok()?;
    if inode == 0 {
        return None;
    }
    let path = fields.next().unwrap_or("").trim_start();
    let dev = makedev(
        u64::from_str_radix(major, 16).ok()?,
        u64::from_str_radix(minor, 16).ok()?,
    );
    Some(MapsLine {
        key: (dev, inode),
        range: (start, end),
        extent: offset.saturating_add(end.saturating_sub(start)),
        path,
    })
}

/// Descriptor link targets that are never weight files.
fn never_weights(target: &[u8]) -> bool {
    !target.starts_with(b"/")
        || target.starts_with(b"/dev/")
        || target.starts_with(b"/proc/")
        || target.starts_with(b"/sys/")
}

/// Calls `hit(key, descriptor number, target)` for each descriptor on a file. False when the
/// `fd` directory could not be listed. The links are read relative to the open directory (one
/// path walk for the listing, none per descriptor: a pod's process holds hundreds of sockets,
/// whose links are read only to be passed over).
fn scan_fds(dir: &Path, mut hit: impl FnMut((u64, u64), u32, &[u8])) -> bool {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let Ok(fd_dir) = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    let Ok(entries) = rustix::fs::Dir::read_from(&fd_dir) else {
        return false;
    };
    let mut link = Vec::with_capacity(256);
    for entry in entries.flatten().take(MAX_FDS_PER_PROCESS) {
        let name = entry.file_name();
        let Some(n) = std::str::from_utf8(name.to_bytes())
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(target) = rustix::fs::readlinkat(&fd_dir, name, std::mem::take(&mut link)) else {
            continue;
        };
        let bytes = target.as_bytes();
        // statat follows the magic link to the open file itself, even a deleted one.
        if !never_weights(bytes)
            && let Ok(st) = rustix::fs::statat(&fd_dir, name, AtFlags::empty())
            && FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
        {
            hit((st.st_dev, st.st_ino), n, bytes);
        }
        link = target.into_bytes();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    fn key_of(path: &Path) -> (u64, u64) {
        let m = fs::metadata(path).expect("stat");
        (m.dev(), m.ino())
    }

    fn weight_file(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, vec![7u8; 4 * 4096]).expect("write");
        path
    }

    fn users_of(path: &Path) -> Vec<FileUse> {
        let key = key_of(path);
        scan_users(Path::new("/proc"), &HashSet::from([key]))
            .remove(&key)
            .unwrap_or_default()
    }

    /// Kills and reaps the mapping child even when an assertion fails.
    struct KillOnDrop(Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    const MAP_AND_WAIT: &str = "import mmap,os,sys,time\n\
        f=open(sys.argv[1],'rb')\n\
        m=mmap.mmap(f.fileno(),0,access=mmap.ACCESS_READ)\n\
        print('ready',os.getpid(),flush=True)\n\
        time.sleep(30)\n";

    #[test]
    fn a_child_that_maps_the_file_is_found_until_it_exits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = weight_file(dir.path(), "model.safetensors");
        let spawned = Command::new("python3")
            .arg("-c")
            .arg(MAP_AND_WAIT)
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::skipped::record(
                    "collect::weights::users::a_child_that_maps_the_file_is_found_until_it_exits",
                    "no python3",
                );
                return;
            }
            Err(e) => panic!("spawn python3: {e}"),
        };
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().expect("stdout");
        let mut ready = String::new();
        BufReader::new(stdout).read_line(&mut ready).expect("read");
        if !ready.starts_with("ready") {
            let mut err = String::new();
            if let Some(mut e) = child.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("python3 did not map the file: {ready:?} {err}");
        }
        let pid: u32 = ready
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("pid");
        // pyenv-style shims exec the interpreter, so this is the child itself.
        assert_eq!(pid, child.0.id());

        let users = users_of(&path);
        assert!(
            users.contains(&FileUse {
                pid,
                mapped: true,
                open: true
            }),
            "{users:?}"
        );

        drop(child); // kill and reap
        let users = users_of(&path);
        assert!(users.iter().all(|u| u.pid != pid), "{users:?}");
    }

    /// Maps (and closes) or opens (and keeps) each path it reads on stdin, answering "done".
    const MAP_ON_DEMAND: &str = "import mmap,sys\n\
        held=[]\n\
        print('ready',flush=True)\n\
        for line in sys.stdin:\n\
        \x20   how,path=line.split()\n\
        \x20   f=open(path,'rb')\n\
        \x20   if how=='map':\n\
        \x20       held.append(mmap.mmap(f.fileno(),0,access=mmap.ACCESS_READ)); f.close()\n\
        \x20   else:\n\
        \x20       held.append(f)\n\
        \x20   print('done',flush=True)\n";

    #[test]
    fn the_cache_sees_a_new_mapping_a_new_descriptor_and_an_exit_at_the_next_scan() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let mapped = weight_file(dir.path(), "mapped.safetensors");
        let opened = weight_file(dir.path(), "opened.gguf");
        let spawned = Command::new("python3")
            .arg("-c")
            .arg(MAP_ON_DEMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::skipped::record(
                    "collect::weights::users::the_cache_sees_a_new_mapping_a_new_descriptor_and_an_exit_at_the_next_scan",
                    "no python3",
                );
                return;
            }
            Err(e) => panic!("spawn python3: {e}"),
        };
        let mut child = KillOnDrop(child);
        let pid = child.0.id();
        let mut stdin = child.0.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.0.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("ready");
        assert_eq!(line.trim(), "ready");
        let wanted = HashSet::from([key_of(&mapped), key_of(&opened)]);
        let interest = |k: (u64, u64)| {
            if wanted.contains(&k) {
                Interest::User
            } else {
                Interest::Ignore
            }
        };
        let table = crate::collect::proctable::ProcTable::new(Path::new("/proc"));
        let mut cache = ProcessFilesCache::new(Path::new("/proc"));
        let scan = |cache: &mut ProcessFilesCache| {
            let live = table.refresh(std::time::Duration::ZERO);
            cache.refresh(Some(&live), true, &|_| true);
            cache.files(&interest).uses
        };
        let users = |uses: &HashMap<(u64, u64), Vec<FileUse>>, path: &Path| {
            uses.get(&key_of(path))
                .map(|v| {
                    v.iter()
                        .filter(|u| u.pid == pid)
                        .cloned()
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        let mut ask = |how: &str, path: &Path| {
            writeln!(stdin, "{how} {}", path.display()).expect("write");
            line.clear();
            stdout.read_line(&mut line).expect("done");
            assert_eq!(line.trim(), "done");
        };

        let uses = scan(&mut cache);
        assert!(users(&uses, &mapped).is_empty());
        let before = (cache.reads, cache.reuses);
        let uses = scan(&mut cache);
        assert!(users(&uses, &mapped).is_empty());
        assert!(
            cache.reuses > before.1,
            "unchanged processes are not read again"
        );

        ask("map", &mapped);
        let uses = scan(&mut cache);
        // (Python's mmap keeps a descriptor of its own: the file is open too.)
        let u = users(&uses, &mapped);
        assert!(
            u.len() == 1 && u[0].mapped,
            "a new mapping is seen at the next scan: {u:?}"
        );
        ask("open", &opened);
        let uses = scan(&mut cache);
        assert_eq!(
            users(&uses, &opened),
            [FileUse {
                pid,
                mapped: false,
                open: true
            }],
            "a new descriptor is seen at the next scan"
        );
        assert_eq!(users(&uses, &mapped).len(), 1, "the mapping is still held");

        drop(child); // kill and reap
        let uses = scan(&mut cache);
        assert!(users(&uses, &mapped).is_empty() && users(&uses, &opened).is_empty());
    }

    #[test]
    fn a_file_this_process_holds_open_is_open_but_not_mapped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = weight_file(dir.path(), "open.gguf");
        let _held = fs::File::open(&path).expect("open");
        let users = users_of(&path);
        assert_eq!(
            users,
            vec![FileUse {
                pid: std::process::id(),
                mapped: false,
                open: true
            }]
        );
    }

    #[test]
    fn a_file_nobody_uses_is_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = weight_file(dir.path(), "idle.bin");
        let key = key_of(&path);
        let found = scan_users(Path::new("/proc"), &HashSet::from([key]));
        assert!(!found.contains_key(&key), "{found:?}");
    }

    #[test]
    fn maps_are_matched_by_hex_device_and_inode_even_when_deleted() {
        let proc_root = tempfile::tempdir().expect("tempdir");
        let dir = proc_root.path().join("4242");
        fs::create_dir_all(dir.join("fd")).expect("mkdir");
        fs::write(
            dir.join("maps"),
            "55d0c0000000-55d0c0001000 r--p 00000000 fd:01 131 /usr/bin/python3\n\
             7f0000000000-7f0000400000 r--s 00000000 fd:01 1234567 /models/a.safetensors (deleted)\n\
             7f0000400000-7f0000800000 r--s 00400000 103:12 99 /other\n\
             7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n",
        )
        .expect("maps");
        // A process without permission to read: no maps file, no fd listing.
        fs::create_dir_all(proc_root.path().join("17")).expect("mkdir");
        fs::create_dir_all(proc_root.path().join("self")).expect("mkdir");

        let a = (makedev(0xfd, 1), 1_234_567);
        let b = (makedev(0x103, 0x12), 99);
        let unused = (makedev(0xfd, 1), 5);
        let found = scan_users(proc_root.path(), &HashSet::from([a, b, unused]));
        let mapped = vec![FileUse {
            pid: 4242,
            mapped: true,
            open: false,
        }];
        assert_eq!(found.get(&a), Some(&mapped));
        assert_eq!(found.get(&b), Some(&mapped));
        assert!(!found.contains_key(&unused));
    }

    #[test]
    fn maps_lines_give_key_map_files_name_and_path() {
        let MapsLine {
            key,
            range,
            extent,
            path,
        } = parse_maps_line(
            "00400000-0040b000 r--s 00001000 fd:01 1234567                    /m/a b.gguf (deleted)\n",
        )
        .expect("a file mapping");
        assert_eq!(key, (makedev(0xfd, 1), 1_234_567));
        assert_eq!(range, (0x400000, 0x40b000));
        assert_eq!(extent, 0x1000 + 0xb000, "offset + length");
        assert_eq!(path, "/m/a b.gguf (deleted)");
        assert_eq!(
            undeleted(path.as_bytes()),
            (PathBuf::from("/m/a b.gguf"), true)
        );
        assert!(parse_maps_line("7ffd0-7ffd1 rw-p 00000000 00:00 0 [stack]\n").is_none());
    }

    #[test]
    fn a_file_outside_every_root_is_a_candidate_with_a_handle_that_opens_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = weight_file(dir.path(), "outside.safetensors");
        let held = fs::File::open(&path).expect("open");
        let key = key_of(&path);
        let found = scan_processes(Path::new("/proc"), &|k| {
            if k == key {
                Interest::Candidate
            } else {
                Interest::Ignore
            }
        });
        let s = found
            .sightings
            .get(&key)
            .expect("seen through our descriptor");
        assert_eq!(s.pid, std::process::id());
        assert_eq!(s.path, path);
        assert!(s.via_fd && !s.deleted);
        assert_eq!(key_of(&s.handle), key, "the handle opens the very file");
        assert!(found.seen.contains(&key));
        drop(held);
    }

    #[test]
    fn descriptors_are_followed_to_the_file_they_point_at() {
        let files = tempfile::tempdir().expect("tempdir");
        let path = weight_file(files.path(), "w.bin");
        let proc_root = tempfile::tempdir().expect("tempdir");
        for pid in ["30", "4"] {
            let fd = proc_root.path().join(pid).join("fd");
            fs::create_dir_all(&fd).expect("mkdir");
            std::os::unix::fs::symlink(&path, fd.join("3")).expect("symlink");
            std::os::unix::fs::symlink("/nonexistent", fd.join("4")).expect("symlink");
        }
        let key = key_of(&path);
        let found = scan_users(proc_root.path(), &HashSet::from([key]));
        let pids: Vec<(u32, bool, bool)> = found[&key]
            .iter()
            .map(|u| (u.pid, u.mapped, u.open))
            .collect();
        assert_eq!(pids, vec![(4, false, true), (30, false, true)]);
    }

    #[test]
    fn one_scan_over_the_real_proc_reports_its_cost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = weight_file(dir.path(), "cost.bin");
        let wanted: HashSet<(u64, u64)> = (0..1000u64)
            .map(|i| (1, i))
            .chain([key_of(&path)])
            .collect();
        let processes = fs::read_dir("/proc")
            .expect("proc")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            })
            .count();
        let started = Instant::now();
        let found = scan_users(Path::new("/proc"), &wanted);
        let took = started.elapsed();
        eprintln!(
            "scan_users: {processes} processes, {} wanted files, {} in use: {took:?}",
            wanted.len(),
            found.len()
        );
        assert!(!found.contains_key(&key_of(&path)));
    }
}
