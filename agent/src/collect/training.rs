//! Training runs: processes that write weight files while they map other weights or use a GPU.
//!
//! Serving maps weights and writes none; training writes checkpoints. The [`Tracker`] watches
//! only the *candidate* processes (those using a weight file, from the inventory, or a GPU, from
//! the GPU samples), so its cost grows with them, never with the node's process count:
//! - [`Tracker::sample`] (cheap, run every second by the sampler thread) reads each
//!   candidate's `/proc/<pid>/fd` links: a weight-format file open for writing (`fdinfo`
//!   `flags` with `O_WRONLY`/`O_RDWR`) makes the process a writer and its directory a checkpoint
//!   directory; a dataset file (Parquet, Arrow, JSONL, WebDataset `.tar` shards, anything under a
//!   Hugging Face datasets cache) of at least the size floor, open or mapped (`maps`: datasets
//!   loads Arrow files by mapping them), is an input;
//! - [`Tracker::runs`] (once per report) joins that with the inventory: the weight files the
//!   writer maps or holds open for reading are its base-weight inputs (with their identity and
//!   sha256), the weight files it was seen writing or that appeared in its checkpoint
//!   directories since the process started are its outputs (fingerprinted by the inventory like
//!   any weight file), and the GPU samples add its GPU-seconds.
//!
//! A process is reported as a run once it has written a weight file and it maps other weights
//! or has used a GPU; from then on it is a run until it exits, and its last reports (ended)
//! carry the base weights it had (an exited process maps nothing). Dataset files of writers up
//! to `[training] dataset_hash_max_bytes` are fingerprinted by the sampler thread, one per
//! sample, outside the tracker's lock, at the weights' hash rate.
//!
//! Bounded: at most [`MAX_RUNS`] tracked writers, [`MAX_INPUTS`] inputs and [`MAX_OUTPUTS`]
//! outputs per run (the rest counted), [`MAX_DIRS`] checkpoint directories per process, and
//! [`crate::collect::weights::users::MAX_FDS_PER_PROCESS`] descriptors read per process and
//! sample; [`MAX_WATCHED`] candidates watched between samples.
//!
//! The sampler reads a candidate's descriptors again only when something can have changed:
//! each candidate keeps its `/proc/<pid>/{io,statm,fd}` open (within a sixteenth of the
//! descriptor limit, at most [`MAX_HELD`]) and a [`Mark`] of them is taken at every sample
//! (`pread` and `fstat`, a few microseconds, against a listing and a `readlink` per descriptor):
//! a `read` or `write` call of any thread (an opened dataset read, a checkpoint written with
//! `write`), a page dirtied through a mapping (`write_bytes`, on disk file systems), a new
//! mapping or a new descriptor moves it. A file written only through a mapping
//! made in place of an unmapped one of the same size, opened in place of a closed descriptor,
//! moves none of them: every candidate is read again at least every `[training] recheck_secs`
//! (120 s; 30 s until the re-reads of 300 idle weight users were measured at a tenth of the whole
//! agent's CPU), those re-reads spread over the samples. A candidate whose mark has not moved for
//! [`IDLE_AFTER_MS`] (a model server without requests, the bench's 300 mappers) is marked only
//! every `[training] idle_mark_secs` (4 s, each at a phase of its own) until it moves: that
//! mark was most of the sampler's cost on a node of idle weight users (three reads per
//! candidate and second). Still for longer, it is marked every eighth of its stillness, at
//! most [`IDLE_GAP_MAX_FACTOR`] times `idle_mark_secs` apart (16 s): those marks were still
//! most of it (300 candidates, 75 marks a second). Candidates without held files are read in full at every sample. `training_descriptors` in the agent's `/metrics` counts both; only
//! candidates seen writing weights or reading datasets keep a record.
//!
//! Known limits: a checkpoint opened, written and closed between two samples is seen only
//! through its directory (a later checkpoint in the same directory caught open, or the first
//! one that is); paths are those the process sees, so a containerised trainer's outputs join the
//! inventory only where the container path is the inventory's path.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use sov_proto::pb;

use super::cache;
use super::weights::hash::{HashError, RateLimiter, sha256_file};
use super::weights::users::MAX_FDS_PER_PROCESS;

/// Dataset files smaller than this are not reported as inputs (configs, vocabularies, indexes).
pub const DEFAULT_DATASET_FLOOR_BYTES: u64 = 1 << 20;
/// Dataset files up to this size are fingerprinted (`[training] dataset_hash_max_bytes`).
pub const DEFAULT_DATASET_HASH_MAX_BYTES: u64 = 256 << 20;
/// At most this many writing processes are tracked at once.
pub const MAX_RUNS: usize = 64;
/// At most this many inputs per run are reported; the rest are counted.
pub const MAX_INPUTS: usize = 256;
/// At most this many outputs per run are reported (the newest); the rest are counted.
pub const MAX_OUTPUTS: usize = 256;
/// At most this many checkpoint directories are remembered per process.
pub const MAX_DIRS: usize = 64;
/// At most this many dataset files are remembered per process.
const MAX_DATASETS: usize = 4096;
/// Candidates' descriptors are read again at least this often (seconds) even when nothing says
/// they changed (`[training] recheck_secs`).
pub const DEFAULT_RECHECK_SECS: u64 = 120;
/// Default of `[training] idle_mark_secs`: a candidate whose mark has not moved for
/// [`IDLE_AFTER_MS`] is marked this often instead of at every sample.
pub const DEFAULT_IDLE_MARK_SECS: u64 = 4;
/// How long a candidate's mark must stay still before it is marked only every
/// `idle_mark_secs`.
pub const IDLE_AFTER_MS: i64 = 30_000;
/// A candidate still for longer than eight times `idle_mark_secs` is marked every eighth of
/// its stillness instead (a model server idle for two minutes, every 16 s): the longer a
/// process has done nothing, the less likely it starts now, and the marks of 300 idle weight
/// users were still most of the sampler's cost.
pub const IDLE_GAP_STILL_DIVISOR: i64 = 8;
/// ... at most this many times `idle_mark_secs` apart (16 s by default): a long-idle
/// candidate's first write is seen within that.
pub const IDLE_GAP_MAX_FACTOR: i64 = 4;
/// At most this many candidates are watched between samples; beyond, read in full each sample.
pub const MAX_WATCHED: usize = 4096;
/// At most this many candidates keep their `/proc` files open (three descriptors each).
pub const MAX_HELD: usize = 1024;
/// Ended runs are reported this many more times, then forgotten.
const ENDED_REPORTS: u8 = 3;
/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, fixed by the ABI).
const USER_HZ: u64 = 100;

/// File name endings of weight formats a trainer writes.
const WEIGHT_ENDINGS: [&str; 7] = [
    ".safetensors",
    ".gguf",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".onnx",
];

/// The dataset format a path names, if any: by extension, else `hf-datasets` below a Hugging
/// Face datasets cache.
pub fn dataset_format(path: &str) -> Option<&'static str> {
    let lower = path.to_ascii_lowercase();
    let ends = |e: &[&str]| e.iter().any(|x| lower.ends_with(x));
    if ends(&[".parquet"]) {
        Some("parquet")
    } else if ends(&[".arrow"]) {
        Some("arrow")
    } else if ends(&[".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson"]) {
        Some("jsonl")
    } else if ends(&[".tar", ".tar.gz", ".tgz"]) {
        Some("webdataset")
    } else if lower.contains("/datasets--") || lower.contains("/huggingface/datasets/") {
        Some("hf-datasets")
    } else {
        None
    }
}

/// The dataset repository id a Hugging Face cache path names (`…/datasets--org--name/…` →
/// `org/name`).
pub fn dataset_repo(path: &str) -> String {
    path.split('/')
        .find_map(|c| c.strip_prefix("datasets--"))
        .map(|r| match r.split_once("--") {
            Some((org, name)) => format!("{org}/{name}"),
            None => r.to_owned(),
        })
        .unwrap_or_default()
}

fn is_weight_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    WEIGHT_ENDINGS.iter().any(|e| lower.ends_with(e))
}

/// What one candidate process was seen doing.
#[derive(Debug, Clone, Default)]
struct Proc {
    /// `starttime` of `/proc/<pid>/stat`: a reused pid is another process.
    start_ticks: u64,
    name: String,
    /// When it was first seen writing a weight file (Unix ms).
    writer_since: Option<i64>,
    last_activity: i64,
    /// Weight files seen open for writing.
    written: BTreeSet<String>,
    /// Their directories.
    dirs: BTreeSet<String>,
    /// Dataset files: path → (size, format, mapped).
    datasets: BTreeMap<String, (u64, &'static str, bool)>,
    /// Outputs' (size, mtime) at the previous report, to see growth and replacement.
    outputs_seen: HashMap<String, (u64, i64)>,
    gpu_seconds: f64,
    ended: bool,
    ended_reports: u8,
    /// The base-weight inputs of the last report of this run (`None` before the first): once
    /// the process has exited no inventory file lists it as a user, and its run is reported
    /// ended with the inputs it had.
    reported_bases: Option<Vec<pb::TrainingInput>>,
}

/// Training-run detection state (see the module doc).
#[derive(Debug)]
pub struct Tracker {
    proc_root: PathBuf,
    procs: HashMap<u32, Proc>,
    boot_id: String,
    boot_ms: i64,
    dataset_floor: u64,
    /// Dataset files up to this size get a sha256; 0: none.
    hash_max_bytes: u64,
    /// Dataset fingerprints: path → (size, mtime ms, sha256; "" when reading it failed).
    dataset_hashes: HashMap<String, (u64, i64, String)>,
    /// Every candidate watched (at most [`MAX_WATCHED`]).
    watch: HashMap<u32, Watch>,
    /// At most this many candidates keep their `/proc` files open (from the descriptor limit).
    held_max: usize,
    /// A candidate's descriptors are read again after this long even when its mark is unchanged.
    recheck_ms: i64,
    /// A candidate still for [`IDLE_AFTER_MS`] is marked this often (at most every sample).
    idle_mark_ms: i64,
    last_sample_ms: Option<i64>,
}

/// One candidate process between samples: its descriptors are read again only when its
/// [`Mark`] moved, or `recheck_secs` after their latest read (a writer through a mapping of a
/// file it opened in place of one it closed moves none of the mark's counts).
#[derive(Debug)]
struct Watch {
    start_ticks: u64,
    /// Its `/proc` files kept open (`None`: read by path, in full at every sample).
    held: Option<HeldFiles>,
    /// The mark read just before its descriptors' latest read.
    mark: Option<Mark>,
    /// When its descriptors were read last (Unix ms).
    read_ms: i64,
    /// When its mark was last seen to move (or first taken).
    moved_ms: i64,
    /// When its mark was last taken.
    marked_ms: i64,
}

/// What moves when a process can have opened, written or mapped a file: its I/O counters
/// (`/proc/<pid>/io`: every `read`/`write` system call of any of its threads moves `rchar` or
/// `wchar` and `syscr` or `syscw`; a page it dirties through a shared mapping of a file on a
/// disk file system moves `write_bytes`), its virtual size (`statm`: a new mapping) and its
/// number of descriptors (the size of `fd/`, Linux 6.2+; 0 before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    io: u64,
    vsize: u64,
    fds: u64,
}

/// A candidate's `/proc/<pid>/{io,statm,fd}` kept open: read again with `pread`/`fstat`, no path
/// lookup; they refer to that very process, so a read that fails says it exited (a reused pid
/// is another directory).
#[derive(Debug)]
struct HeldFiles {
    io: fs::File,
    statm: fs::File,
    fd_dir: fs::File,
}

impl HeldFiles {
    fn open(dir: &Path) -> Option<Self> {
        Some(Self {
            io: fs::File::open(dir.join("io")).ok()?,
            statm: fs::File::open(dir.join("statm")).ok()?,
            fd_dir: fs::File::open(dir.join("fd")).ok()?,
        })
    }

    /// The process's mark now; `None` once it has exited.
    fn mark(&self) -> Option<Mark> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 512];
        let n = self.io.read_at(&mut buf, 0).ok().filter(|&n| n > 0)?;
        // FNV-1a of the counters' text.
        let io = buf
            .get(..n)?
            .iter()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        let n = self.statm.read_at(&mut buf, 0).ok().filter(|&n| n > 0)?;
        let vsize = std::str::from_utf8(buf.get(..n)?)
            .ok()?
            .split_ascii_whitespace()
            .next()?
            .parse()
            .ok()?;
        let fds = self.fd_dir.metadata().ok()?.len();
        Some(Mark { io, vsize, fds })
    }
}

/// Size and modification time (ms) of a file.
fn size_mtime(path: &Path) -> Option<(u64, i64)> {
    let m = fs::metadata(path).ok()?;
    Some((m.len(), m.mtime() * 1000 + m.mtime_nsec() / 1_000_000))
}

impl Tracker {
    /// A tracker reading `proc_root` (`/proc`), reporting datasets of at least `dataset_floor`
    /// bytes.
    pub fn new(proc_root: &Path, dataset_floor: u64) -> Self {
        let boot_id = fs::read_to_string(proc_root.join("sys/kernel/random/boot_id"))
            .map(|s| s.trim().chars().take(8).collect())
            .unwrap_or_default();
        let boot_ms = fs::read_to_string(proc_root.join("stat"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime "))
                    .and_then(|v| v.trim().parse::<i64>().ok())
            })
            .map_or(0, |s| s * 1000);
        Self {
            proc_root: proc_root.to_path_buf(),
            procs: HashMap::new(),
            boot_id,
            boot_ms,
            dataset_floor,
            hash_max_bytes: 0,
            dataset_hashes: HashMap::new(),
            watch: HashMap::new(),
            // Three descriptors per held candidate, within a sixteenth of the limit.
            held_max: crate::collect::descriptor_limit()
                .map_or(0, |l| usize::try_from(l / 16 / 3).unwrap_or(usize::MAX))
                .min(MAX_HELD),
            recheck_ms: i64::try_from(DEFAULT_RECHECK_SECS * 1000).unwrap_or(i64::MAX),
            idle_mark_ms: i64::try_from(DEFAULT_IDLE_MARK_SECS * 1000).unwrap_or(i64::MAX),
            last_sample_ms: None,
        }
    }

    /// Fingerprint dataset files up to `max_bytes` (0: none).
    pub fn with_dataset_hashes(mut self, max_bytes: u64) -> Self {
        self.hash_max_bytes = max_bytes;
        self
    }

    /// A dataset file of a writer that has no fingerprint for its current version, with that
    /// version's (size, mtime).
    fn next_unhashed(&self) -> Option<(String, u64, i64)> {
        if self.hash_max_bytes == 0 || self.dataset_hashes.len() >= MAX_DATASETS {
            return None;
        }
        self.procs
            .values()
            .filter(|p| p.writer_since.is_some() && !p.ended)
            .flat_map(|p| p.datasets.iter())
            .filter(|(_, (size, _, _))| *size > 0 && *size <= self.hash_max_bytes)
            .find_map(|(path, _)| {
                let (size, mtime) = size_mtime(Path::new(path))?;
                let known = self
                    .dataset_hashes
                    .get(path)
                    .is_some_and(|(s, m, _)| (*s, *m) == (size, mtime));
                (!known && size <= self.hash_max_bytes).then(|| (path.clone(), size, mtime))
            })
    }

    /// Read candidates' descriptors again at least every `secs` seconds even when nothing
    /// says they changed (`[training] recheck_secs`; 0: at every sample, as without marks).
    pub fn with_recheck_secs(mut self, secs: u64) -> Self {
        self.recheck_ms = i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        self
    }

    /// Mark a candidate whose mark has been still for [`IDLE_AFTER_MS`] only every `secs`
    /// seconds (`[training] idle_mark_secs`; 0 or 1: at every sample, as before).
    pub fn with_idle_mark_secs(mut self, secs: u64) -> Self {
        self.idle_mark_ms = i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        self
    }

    /// How long a candidate still for `still_ms` goes between two marks: `idle_mark_ms`, or
    /// an eighth of its stillness when that is longer, at most [`IDLE_GAP_MAX_FACTOR`] times
    /// `idle_mark_ms` (`idle_mark_ms` of a second or less: every sample).
    fn idle_gap_ms(&self, still_ms: i64) -> i64 {
        if self.idle_mark_ms <= 1_000 {
            return self.idle_mark_ms;
        }
        (still_ms / IDLE_GAP_STILL_DIVISOR).clamp(
            self.idle_mark_ms,
            self.idle_mark_ms.saturating_mul(IDLE_GAP_MAX_FACTOR),
        )
    }

    /// Look at the candidates' open descriptors (and maps, for datasets) now: each one whose
    /// [`Mark`] moved since its previous read, each new one, and, spread over the samples, each
    /// one not read for `recheck_secs`; the others are passed over (see [`Watch`]).
    pub fn sample(&mut self, candidates: &[u32], now_ms: i64) {
        let wanted: HashSet<u32> = candidates.iter().copied().collect();
        self.watch.retain(|pid, _| wanted.contains(pid));
        // Rechecks due at this sample: the watched candidates' share of one round per
        // `recheck_ms` (at least one).
        let since = self
            .last_sample_ms
            .map_or(self.recheck_ms, |t| now_ms.saturating_sub(t).max(0));
        self.last_sample_ms = Some(now_ms);
        let quota = if self.recheck_ms <= 0 {
            usize::MAX
        } else {
            let n = u64::try_from(self.watch.len()).unwrap_or(u64::MAX);
            let since = u64::try_from(since).unwrap_or(0);
            let round = u64::try_from(self.recheck_ms).unwrap_or(u64::MAX);
            usize::try_from(n.saturating_mul(since).div_ceil(round).max(1)).unwrap_or(usize::MAX)
        };
        let (mut reads, mut passed) = (0u64, 0u64);
        // The rechecks of this sample, chosen before any mark: the held candidates unread
        // for `recheck_ms`, longest first, up to the quota. A candidate due but left for a
        // later sample keeps its still candidate's rhythm meanwhile (after a start, or when
        // many candidates came together, all of them fall due in the same sample, and each
        // used to be marked at every sample until its turn came: 300 mappers waiting a
        // hundred seconds).
        let recheck: HashSet<u32> = {
            let mut due: Vec<(i64, u32)> = candidates
                .iter()
                .filter_map(|pid| {
                    let w = self.watch.get(pid)?;
                    (w.held.is_some() && now_ms.saturating_sub(w.read_ms) >= self.recheck_ms)
                        .then_some((w.read_ms, *pid))
                })
                .collect();
            if due.len() > quota {
                due.select_nth_unstable(quota);
                due.truncate(quota);
            }
            due.into_iter().map(|(_, pid)| pid).collect()
        };
        let mut due: Vec<(i64, u32)> = Vec::new();
        for &pid in candidates {
            if let Some(w) = self.watch.get(&pid) {
                let Some(held) = &w.held else {
                    // Not held: read in full at every sample, as before marks.
                    reads += 1;
                    self.read_unheld(pid, now_ms);
                    continue;
                };
                let (prev, read_ms, moved_ms, marked_ms, start_ticks) =
                    (w.mark, w.read_ms, w.moved_ms, w.marked_ms, w.start_ticks);
                let still_ms = now_ms.saturating_sub(moved_ms);
                if still_ms >= IDLE_AFTER_MS
                    && now_ms.saturating_sub(marked_ms)
                        < self.idle_gap_ms(still_ms).saturating_sub(500)
                    && !recheck.contains(&pid)
                {
                    // Still for a while: marked again only every `idle_mark_ms`, or an
                    // eighth of its stillness up to `IDLE_GAP_MAX_FACTOR` times that (half a
                    // second early, so that a sampler a little late does not skip a round).
                    passed += 1;
                    continue;
                }
                let mark = held.mark();
                let idle_mark_ms = self.idle_mark_ms;
                match mark {
                    None => {
                        // Exited (held files refer to that very process): a new process under
                        // the same pid is watched afresh.
                        self.watch.remove(&pid);
                    }
                    Some(mark) if Some(mark) != prev => {
                        reads += 1;
                        if let Some(w) = self.watch.get_mut(&pid) {
                            w.mark = Some(mark);
                            w.read_ms = now_ms;
                            w.moved_ms = now_ms;
                            w.marked_ms = now_ms;
                        }
                        self.read_descriptors(pid, start_ticks, None, now_ms);
                    }
                    Some(_) => {
                        if let Some(w) = self.watch.get_mut(&pid) {
                            w.marked_ms = now_ms;
                            let went_still = marked_ms.saturating_sub(moved_ms) < IDLE_AFTER_MS
                                && now_ms.saturating_sub(moved_ms) >= IDLE_AFTER_MS;
                            if went_still && idle_mark_ms > 1_000 {
                                // Just gone still: its next marks fall at a phase of its own,
                                // so that candidates that went still together are not all
                                // marked in the same samples.
                                w.marked_ms = now_ms.saturating_sub(i64::from(pid) % idle_mark_ms);
                            }
                        }
                        if recheck.contains(&pid) {
                            due.push((read_ms, pid));
                        } else {
                            passed += 1;
                        }
                    }
                }
                continue;
            }
            reads += 1;
            if self.watch.len() >= MAX_WATCHED {
                self.read_unheld(pid, now_ms);
                continue;
            }
            // A new candidate: its files first, then who it is (the held files refer to that
            // process or to one that exited, never to a later one under the same pid).
            let held = (self.watch.values().filter(|w| w.held.is_some()).count() < self.held_max)
                .then(|| HeldFiles::open(&self.proc_root.join(pid.to_string())))
                .flatten();
            let mark = held.as_ref().and_then(HeldFiles::mark);
            let Some((name, start_ticks)) = self.stat(pid) else {
                continue;
            };
            self.watch.insert(
                pid,
                Watch {
                    start_ticks,
                    held,
                    mark,
                    read_ms: now_ms,
                    moved_ms: now_ms,
                    marked_ms: now_ms,
                },
            );
            self.read_descriptors(pid, start_ticks, Some(name), now_ms);
        }
        // Rechecks, the longest unread first, up to the quota; the rest wait for the next
        // samples.
        due.sort_unstable();
        for (i, (_, pid)) in due.into_iter().enumerate() {
            if i >= quota {
                passed += 1;
                continue;
            }
            reads += 1;
            let Some(w) = self.watch.get_mut(&pid) else {
                continue;
            };
            w.read_ms = now_ms;
            let start_ticks = w.start_ticks;
            self.read_descriptors(pid, start_ticks, None, now_ms);
        }
        cache::TRAINING_SAMPLE.misses(reads);
        cache::TRAINING_SAMPLE.hits(passed);
        cache::TRAINING_SAMPLE.entries(self.watch.len());
    }

    /// A candidate without held files: who it is and its descriptors, read now.
    fn read_unheld(&mut self, pid: u32, now_ms: i64) {
        let Some((name, start_ticks)) = self.stat(pid) else {
            self.watch.remove(&pid);
            return;
        };
        if let Some(w) = self.watch.get_mut(&pid) {
            w.start_ticks = start_ticks;
            w.read_ms = now_ms;
        }
        self.read_descriptors(pid, start_ticks, Some(name), now_ms);
    }

    /// Read one candidate's descriptors (and maps, once it writes weights or reads datasets)
    /// into its record; a candidate that shows neither keeps no record. `name` is its name
    /// when just read (needed for a new record).
    fn read_descriptors(&mut self, pid: u32, start_ticks: u64, name: Option<String>, now_ms: i64) {
        let floor = self.dataset_floor;
        let dir = self.proc_root.join(pid.to_string());
        if let Some(p) = self.procs.get_mut(&pid)
            && p.start_ticks == start_ticks
            && !p.ended
        {
            scan_fds(&dir, floor, p, now_ms);
            if p.writer_since.is_some() || !p.datasets.is_empty() {
                scan_maps(&dir, floor, p);
            }
            return;
        }
        let name = match name {
            Some(n) => n,
            None => match self.stat(pid) {
                Some((n, s)) if s == start_ticks => n,
                _ => return,
            },
        };
        let mut p = Proc {
            start_ticks,
            name,
            ..Proc::default()
        };
        scan_fds(&dir, floor, &mut p, now_ms);
        if p.writer_since.is_none() && p.datasets.is_empty() {
            // Nothing to remember (a record of another process under this pid is replaced,
            // as a new record would replace it).
            self.procs.remove(&pid);
            return;
        }
        scan_maps(&dir, floor, &mut p);
        if !self.procs.contains_key(&pid) && self.procs.len() >= MAX_RUNS * 4 {
            // Keep the writers; forget readers of datasets first.
            self.procs.retain(|_, p| p.writer_since.is_some());
            if self.procs.len() >= MAX_RUNS * 4 {
                return;
            }
        }
        self.procs.insert(pid, p);
    }

    /// The runs to report now. `files` are the inventory's weight files (with their users),
    /// `gpus` the latest GPU samples (their per-process GPU-seconds are added to the runs'),
    /// `container` names a pid's container.
    pub fn runs(
        &mut self,
        files: &[pb::WeightFile],
        gpus: &[pb::GpuSample],
        container: &dyn Fn(u32) -> Option<pb::ContainerRef>,
        now_ms: i64,
    ) -> Vec<pb::TrainingRun> {
        let mut gpu_by_pid: HashMap<u32, f64> = HashMap::new();
        for d in gpus {
            for p in &d.processes {
                *gpu_by_pid.entry(p.pid).or_default() += p.gpu_seconds;
            }
        }
        // Processes gone (or replaced under their pid) end their runs.
        let pids: Vec<u32> = self.procs.keys().copied().collect();
        for pid in pids {
            let alive = self.stat(pid).map(|(_, s)| s);
            let Some(p) = self.procs.get_mut(&pid) else {
                continue;
            };
            if alive != Some(p.start_ticks) {
                p.ended = true;
            }
            if !p.ended {
                p.gpu_seconds += gpu_by_pid.get(&pid).copied().unwrap_or(0.0);
            }
        }
        let mut out = Vec::new();
        let boot_ms = self.boot_ms;
        for (&pid, p) in &mut self.procs {
            let Some(since) = p.writer_since else {
                continue;
            };
            let started_ms = if boot_ms > 0 {
                boot_ms + i64::try_from(p.start_ticks.saturating_mul(1000) / USER_HZ).unwrap_or(0)
            } else {
                since
            };
            let mut inputs = Vec::new();
            let mut outputs = Vec::new();
            for f in files {
                let is_output = p.written.contains(&f.path)
                    || (Path::new(&f.path)
                        .parent()
                        .is_some_and(|d| p.dirs.contains(d.to_string_lossy().as_ref()))
                        && f.mtime_unix_ms >= started_ms);
                let model = f
                    .identity
                    .as_ref()
                    .map(|i| i.model.clone())
                    .unwrap_or_default();
                if is_output {
                    outputs.push(pb::TrainingOutput {
                        path: f.path.clone(),
                        size_bytes: f.size_bytes,
                        mtime_unix_ms: f.mtime_unix_ms,
                        sha256: f.sha256.clone(),
                        model,
                    });
                } else if let Some(u) = f.users.iter().find(|u| u.pid == pid) {
                    inputs.push(pb::TrainingInput {
                        kind: "base-weights".into(),
                        path: f.path.clone(),
                        size_bytes: f.size_bytes,
                        sha256: f.sha256.clone(),
                        model,
                        format: String::new(),
                        mapped: u.mapped,
                    });
                }
            }
            // Outputs being written that the inventory has not listed yet.
            for w in &p.written {
                if !outputs.iter().any(|o| &o.path == w)
                    && let Ok(m) = fs::metadata(w)
                {
                    outputs.push(pb::TrainingOutput {
                        path: w.clone(),
                        size_bytes: m.len(),
                        mtime_unix_ms: m.mtime() * 1000 + m.mtime_nsec() / 1_000_000,
                        ..Default::default()
                    });
                }
            }
            if p.ended
                && let Some(bases) = &p.reported_bases
            {
                inputs.clone_from(bases);
            }
            let uses_gpu = p.gpu_seconds > 0.0 || gpu_by_pid.contains_key(&pid);
            let has_base = inputs.iter().any(|i| i.kind == "base-weights");
            let was_run = p.reported_bases.is_some();
            if !was_run && (outputs.is_empty() || !(has_base || uses_gpu)) {
                continue;
            }
            p.reported_bases = Some(inputs.clone());
            // New, grown or replaced outputs are activity.
            for o in &outputs {
                let now = (o.size_bytes, o.mtime_unix_ms);
                if p.outputs_seen.insert(o.path.clone(), now) != Some(now) {
                    p.last_activity = p.last_activity.max(o.mtime_unix_ms.min(now_ms));
                }
            }
            for (path, (size, format, mapped)) in &p.datasets {
                let sha256 = self
                    .dataset_hashes
                    .get(path)
                    .filter(|(s, _, _)| s == size)
                    .map(|(_, _, h)| h.clone())
                    .unwrap_or_default();
                inputs.push(pb::TrainingInput {
                    kind: "dataset".into(),
                    path: path.clone(),
                    size_bytes: *size,
                    sha256,
                    model: dataset_repo(path),
                    format: (*format).to_owned(),
                    mapped: *mapped,
                });
            }
            let inputs_left_out = inputs.len().saturating_sub(MAX_INPUTS);
            inputs.truncate(MAX_INPUTS);
            outputs.sort_by(|a, b| {
                b.mtime_unix_ms
                    .cmp(&a.mtime_unix_ms)
                    .then(a.path.cmp(&b.path))
            });
            let outputs_left_out = outputs.len().saturating_sub(MAX_OUTPUTS);
            outputs.truncate(MAX_OUTPUTS);
            out.push(pb::TrainingRun {
                run_id: format!("{pid}-{}-{}", p.start_ticks, self.boot_id),
                pid,
                process: p.name.clone(),
                container: container(pid),
                start_unix_ms: since,
                last_activity_unix_ms: p.last_activity.max(since),
                gpu_seconds: p.gpu_seconds,
                inputs,
                outputs,
                ended: p.ended,
                inputs_left_out: u32::try_from(inputs_left_out).unwrap_or(u32::MAX),
                outputs_left_out: u32::try_from(outputs_left_out).unwrap_or(u32::MAX),
            });
        }
        // Forget ended processes after a few reports, and ended non-writers at once.
        self.procs.retain(|_, p| {
            if !p.ended {
                return true;
            }
            p.ended_reports += 1;
            p.writer_since.is_some() && p.ended_reports <= ENDED_REPORTS
        });
        out.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        out.truncate(MAX_RUNS);
        out
    }

    /// Name and start time of a live process.
    fn stat(&self, pid: u32) -> Option<(String, u64)> {
        let bytes = fs::read(self.proc_root.join(pid.to_string()).join("stat")).ok()?;
        let open = bytes.iter().position(|&b| b == b'(')?;
        let close = bytes.iter().rposition(|&b| b == b')')?;
        let name = String::from_utf8_lossy(bytes.get(open + 1..close)?).into_owned();
        let rest = std::str::from_utf8(bytes.get(close + 1..)?).ok()?;
        // Field 22 of proc(5) is the 20th after the name.
        let start: u64 = rest.split_ascii_whitespace().nth(19)?.parse().ok()?;
        Some((name, start))
    }
}

/// The tracker shared by the sampler thread and the report builder.
#[derive(Debug, Clone)]
pub struct TrainingHandle {
    tracker: Arc<Mutex<Tracker>>,
    candidates: Arc<Mutex<Vec<u32>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TrainingHandle {
    pub fn new(tracker: Tracker) -> Self {
        Self {
            tracker: Arc::new(Mutex::new(tracker)),
            candidates: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The processes to watch from now on (weight users and GPU processes).
    pub fn set_candidates(&self, mut pids: Vec<u32>) {
        pids.sort_unstable();
        pids.dedup();
        *lock(&self.candidates) = pids;
    }

    /// One look at the candidates now.
    pub fn sample(&self, now_ms: i64) {
        let pids = lock(&self.candidates).clone();
        if !pids.is_empty() {
            lock(&self.tracker).sample(&pids, now_ms);
        }
    }

    /// Fingerprint one dataset file that a writer reads and that has no sha256 yet (outside
    /// the tracker's lock, at `limiter`'s rate); false when there was none.
    pub fn hash_one_dataset(&self, limiter: &mut RateLimiter, stop: &AtomicBool) -> bool {
        let Some((path, size, mtime)) = lock(&self.tracker).next_unhashed() else {
            return false;
        };
        let sha = match sha256_file(Path::new(&path), limiter, stop, &mut |_| {}) {
            Ok(sha) => sha,
            Err(HashError::Cancelled) => return false,
            Err(e) => {
                tracing::debug!(path = %path, error = %e, "dataset file not fingerprinted");
                String::new()
            }
        };
        lock(&self.tracker)
            .dataset_hashes
            .insert(path, (size, mtime, sha));
        true
    }

    /// Whether some process was seen writing weights (only then does a report need the
    /// inventory joined).
    pub fn has_writers(&self) -> bool {
        lock(&self.tracker)
            .procs
            .values()
            .any(|p| p.writer_since.is_some())
    }

    /// The checkpoint directories of every writer (to be searched for weight files).
    pub fn output_dirs(&self) -> Vec<PathBuf> {
        let t = lock(&self.tracker);
        let mut dirs: Vec<PathBuf> = t
            .procs
            .values()
            .flat_map(|p| p.dirs.iter().map(PathBuf::from))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs.truncate(MAX_DIRS);
        dirs
    }

    /// [`Tracker::runs`].
    pub fn runs(
        &self,
        files: &[pb::WeightFile],
        gpus: &[pb::GpuSample],
        container: &dyn Fn(u32) -> Option<pb::ContainerRef>,
        now_ms: i64,
    ) -> Vec<pb::TrainingRun> {
        lock(&self.tracker).runs(files, gpus, container, now_ms)
    }

    /// Sample every `interval` until `stop` is set (the body of the sampler thread),
    /// fingerprinting at most one dataset file per sample at `hash_bytes_per_sec` (`None`:
    /// unlimited).
    pub fn sample_until(
        &self,
        interval: std::time::Duration,
        hash_bytes_per_sec: Option<u64>,
        stop: &AtomicBool,
    ) {
        let mut limiter = RateLimiter::new(hash_bytes_per_sec);
        while !stop.load(Ordering::Relaxed) {
            self.sample(sov_common::clock::now_unix_ms());
            self.hash_one_dataset(&mut limiter, stop);
            let until = std::time::Instant::now() + interval;
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                std::thread::sleep(
                    until
                        .saturating_duration_since(std::time::Instant::now())
                        .min(std::time::Duration::from_millis(200)),
                );
            }
        }
    }
}

/// Whether `fdinfo` says the descriptor was opened for writing.
fn open_for_writing(fdinfo: &Path) -> bool {
    let Ok(text) = fs::read_to_string(fdinfo) else {
        return false;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .is_some_and(|flags| flags & 0o3 != 0)
}

/// How a `/proc/<pid>/fd/<n>` link's own mode tells the descriptor's access mode: procfs sets
/// the owner's write bit exactly when the file was opened for writing (`lr-x------` reading,
/// `l-wx------` writing, `lrwx------` both); `None` for a link that is not procfs's (no
/// group or other bits there), whose `fdinfo` is read instead.
fn link_mode_writes(mode: u32) -> Option<bool> {
    (mode & 0o077 == 0).then_some(mode & 0o200 != 0)
}

/// A candidate's descriptors: its links read relative to its `fd/` directory (one open for
/// the listing; no path walk per descriptor), whether a weight file is open for writing from the
/// link's own mode (one `statat` instead of opening and reading its `fdinfo`).
fn scan_fds(dir: &Path, floor: u64, p: &mut Proc, now_ms: i64) {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let Ok(fd_dir) = rustix::fs::open(
        dir.join("fd"),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let Ok(entries) = rustix::fs::Dir::read_from(&fd_dir) else {
        return;
    };
    let mut link = Vec::with_capacity(256);
    for entry in entries
        .flatten()
        .filter(|e| e.file_name().to_bytes().first() != Some(&b'.'))
        .take(MAX_FDS_PER_PROCESS)
    {
        let name = entry.file_name();
        let Ok(target) = rustix::fs::readlinkat(&fd_dir, name, std::mem::take(&mut link)) else {
            continue;
        };
        let bytes = target.as_bytes();
        if bytes.first() != Some(&b'/') {
            link = target.into_bytes();
            continue; // socket:, pipe:, anon_inode:
        }
        let path = String::from_utf8_lossy(bytes).into_owned();
        link = target.into_bytes();
        if is_weight_path(&path) {
            let writes = rustix::fs::statat(&fd_dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .ok()
                .and_then(|st| link_mode_writes(st.st_mode))
                .unwrap_or_else(|| {
                    let n = String::from_utf8_lossy(name.to_bytes()).into_owned();
                    open_for_writing(&dir.join("fdinfo").join(n))
                });
            if writes {
                p.writer_since.get_or_insert(now_ms);
                p.last_activity = now_ms;
                let parent = Path::new(&path).parent();
                if let Some(parent) = parent
                    && (p.dirs.len() < MAX_DIRS
                        || p.dirs.contains(parent.to_string_lossy().as_ref()))
                {
                    p.dirs.insert(parent.to_string_lossy().into_owned());
                }
                if p.written.len() < MAX_OUTPUTS * 4 {
                    p.written.insert(path);
                }
            }
        } else if let Some(format) = dataset_format(&path)
            && p.datasets.len() < MAX_DATASETS
            && let Ok(st) = rustix::fs::statat(&fd_dir, name, AtFlags::empty())
            && rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            && u64::try_from(st.st_size).unwrap_or(0) >= floor
        {
            let len = u64::try_from(st.st_size).unwrap_or(0);
            let slot = p.datasets.entry(path).or_insert((len, format, false));
            slot.0 = len;
        }
    }
}

/// Dataset files the process maps (Arrow tables loaded by mapping).
fn scan_maps(dir: &Path, floor: u64, p: &mut Proc) {
    let Ok(file) = fs::File::open(dir.join("maps")) else {
        return;
    };
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for line in BufReader::new(file).lines().map_while(Result::ok) {
        // address perms offset dev inode path
        let Some(path) = line.split_ascii_whitespace().nth(5) else {
            continue;
        };
        if !path.starts_with('/') || seen.contains(path) {
            continue;
        }
        let Some(format) = dataset_format(path) else {
            continue;
        };
        seen.insert(path.to_owned());
        if p.datasets.len() >= MAX_DATASETS && !p.datasets.contains_key(path) {
            continue;
        }
        let size = fs::metadata(dir.join("root").join(path.trim_start_matches('/')))
            .map(|m| m.len())
            .unwrap_or(0);
        if size >= floor {
            let slot = p
                .datasets
                .entry(path.to_owned())
                .or_insert((size, format, true));
            slot.0 = size;
            slot.2 = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_formats_are_named_by_extension_or_cache_layout() {
        assert_eq!(
            dataset_format("/d/train-00000-of-00004.parquet"),
            Some("parquet")
        );
        assert_eq!(
            dataset_format("/d/data-00000-of-00001.arrow"),
            Some("arrow")
        );
        assert_eq!(dataset_format("/d/corpus.jsonl.zst"), Some("jsonl"));
        assert_eq!(dataset_format("/d/shard-000001.tar"), Some("webdataset"));
        assert_eq!(
            dataset_format("/h/datasets--org--darija/snapshots/r/x.bin"),
            Some("hf-datasets")
        );
        assert_eq!(dataset_format("/m/model.safetensors"), None);
        assert_eq!(
            dataset_repo("/h/datasets--org--darija/snapshots/r/x.parquet"),
            "org/darija"
        );
        assert_eq!(dataset_repo("/d/x.parquet"), "");
        assert!(is_weight_path("/o/checkpoint-100/model.SAFETENSORS"));
        assert!(!is_weight_path("/o/trainer_state.json"));
    }

    #[test]
    fn a_descriptor_links_mode_tells_writing_from_reading() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("w.safetensors");
        let r = fs::File::create(&path).and_then(|_| fs::File::open(&path));
        let r = r.expect("open for reading");
        let w = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open for writing");
        let rw = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open both");
        use std::os::fd::AsRawFd;
        let mode = |f: &fs::File| {
            fs::symlink_metadata(format!("/proc/self/fd/{}", f.as_raw_fd()))
                .expect("lstat")
                .mode()
        };
        assert_eq!(link_mode_writes(mode(&r)), Some(false));
        assert_eq!(link_mode_writes(mode(&w)), Some(true));
        assert_eq!(link_mode_writes(mode(&rw)), Some(true));
        // A symbolic link outside procfs (lrwxrwxrwx) says nothing: fdinfo is read.
        let other = tmp.path().join("link");
        std::os::unix::fs::symlink(&path, &other).expect("symlink");
        let m = fs::symlink_metadata(&other).expect("lstat").mode();
        assert_eq!(link_mode_writes(m), None);
    }

    #[test]
    fn fdinfo_flags_tell_writing_from_reading() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let info = tmp.path().join("fdinfo");
        fs::write(&info, "pos:\t0\nflags:\t0100001\nmnt_id:\t30\n").expect("write");
        assert!(open_for_writing(&info));
        fs::write(&info, "pos:\t0\nflags:\t0100002\n").expect("write");
        assert!(open_for_writing(&info));
        fs::write(&info, "pos:\t0\nflags:\t0100000\n").expect("write");
        assert!(!open_for_writing(&info));
        fs::write(&info, "flags:\tzz\n").expect("write");
        assert!(!open_for_writing(&info));
    }

    #[test]
    fn this_process_writing_a_checkpoint_while_mapping_a_base_is_a_run() {
        use std::io::Write;
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path().join("base/model.safetensors");
        fs::create_dir_all(base.parent().expect("parent")).expect("mkdir");
        fs::write(&base, vec![0u8; 4096]).expect("write");
        let data = tmp.path().join("data/train.parquet");
        fs::create_dir_all(data.parent().expect("parent")).expect("mkdir");
        fs::write(&data, vec![1u8; 2048]).expect("write");
        let out_dir = tmp.path().join("out");
        fs::create_dir_all(&out_dir).expect("mkdir");
        let ckpt = out_dir.join("checkpoint-1.safetensors");

        let _dataset = fs::File::open(&data).expect("open dataset");
        let mut writer = fs::File::create(&ckpt).expect("create ckpt");
        writer.write_all(&[2u8; 1024]).expect("write");

        let me = std::process::id();
        let t =
            TrainingHandle::new(Tracker::new(Path::new("/proc"), 1024).with_dataset_hashes(4096));
        t.set_candidates(vec![me]);
        t.sample(1_000);
        // Dataset files up to 4096 bytes are fingerprinted, one per call (other tests' files
        // may be open in this process too).
        let stop = AtomicBool::new(false);
        let mut limiter = RateLimiter::new(None);
        for _ in 0..64 {
            if !t.hash_one_dataset(&mut limiter, &stop) {
                break;
            }
        }
        let user = |pid| pb::WeightUser {
            pid,
            mapped: true,
            ..Default::default()
        };
        let inventory = vec![pb::WeightFile {
            path: base.to_string_lossy().into_owned(),
            size_bytes: 4096,
            sha256: "b".repeat(64),
            identity: Some(pb::ModelIdentity {
                model: "mistralai/Mistral-7B-v0.1".into(),
                ..Default::default()
            }),
            users: vec![user(me)],
            ..Default::default()
        }];
        let runs = t.runs(&inventory, &[], &|_| None, 2_000);
        assert_eq!(runs.len(), 1, "{runs:#?}");
        let r = &runs[0];
        assert_eq!(r.pid, me);
        assert!(r.run_id.starts_with(&format!("{me}-")));
        assert!(!r.ended);
        // (Other tests of this binary may write files at the same time: look for ours.)
        let input = |kind: &str, path: &Path| {
            r.inputs
                .iter()
                .find(|i| i.kind == kind && i.path == path.to_string_lossy())
        };
        let b = input("base-weights", &base).expect("the base is an input");
        assert_eq!(b.model, "mistralai/Mistral-7B-v0.1");
        assert_eq!(b.sha256, "b".repeat(64));
        let d = input("dataset", &data).expect("the dataset is an input");
        assert_eq!((d.format.as_str(), d.size_bytes), ("parquet", 2048));
        assert_eq!(d.sha256, crate::enroll::sha256_hex(&[1u8; 2048]));
        assert!(
            r.outputs.iter().any(|o| o.path == ckpt.to_string_lossy()),
            "{r:#?}"
        );

        // Once a run, a run until it ends: the next report without the inventory still has it.
        assert_eq!(t.runs(&[], &[], &|_| None, 2_500).len(), 1);
        // Without a base mapped and without a GPU, writing a weight file is no training run.
        let t = TrainingHandle::new(Tracker::new(Path::new("/proc"), 1024));
        t.set_candidates(vec![me]);
        t.sample(2_800);
        let runs = t.runs(&[], &[], &|_| None, 3_000);
        assert!(runs.is_empty(), "{runs:#?}");
        // With a GPU it is.
        let gpu = pb::GpuSample {
            processes: vec![pb::GpuProcess {
                pid: me,
                gpu_seconds: 5.0,
                ..Default::default()
            }],
            ..Default::default()
        };
        let runs = t.runs(&[], &[gpu], &|_| None, 4_000);
        assert_eq!(runs.len(), 1);
        assert!(runs[0].gpu_seconds >= 5.0);
    }

    /// A child that does nothing until killed.
    struct Idle(std::process::Child);

    impl Idle {
        /// Started and asleep: a new process reads and maps its libraries after `exec`
        /// (moving its mark), so the test waits until its state is `S`.
        fn start() -> Self {
            let child = std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("sleep");
            let stat = format!("/proc/{}/stat", child.id());
            let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while fs::read_to_string(&stat)
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('S')))
                != Some(true)
            {
                assert!(std::time::Instant::now() < until, "sleep never slept");
                std::thread::yield_now();
            }
            Self(child)
        }
    }

    impl Drop for Idle {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_quiet_candidate_is_passed_over_and_rechecks_are_spread() {
        let idle: Vec<Idle> = (0..3).map(|_| Idle::start()).collect();
        let pids: Vec<u32> = idle.iter().map(|c| c.0.id()).collect();
        let mut t = Tracker::new(Path::new("/proc"), 1024).with_recheck_secs(3);
        if t.held_max == 0 {
            return; // no descriptor limit readable: every candidate is read in full
        }
        t.sample(&pids, 0);
        for pid in &pids {
            let w = &t.watch[pid];
            assert!(w.held.is_some() && w.mark.is_some(), "{w:?}");
            assert_eq!(w.read_ms, 0);
        }
        // Nothing moved: passed over.
        t.sample(&pids, 1_000);
        t.sample(&pids, 2_000);
        assert!(pids.iter().all(|p| t.watch[p].read_ms == 0));
        // Three seconds on, all are due; one a second is read again (3 candidates, 3 s).
        t.sample(&pids, 3_000);
        let read: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| t.watch[p].read_ms == 3_000)
            .collect();
        assert_eq!(read.len(), 1, "{:?}", t.watch);
        t.sample(&pids, 4_000);
        t.sample(&pids, 5_000);
        let mut at: Vec<i64> = pids.iter().map(|p| t.watch[p].read_ms).collect();
        at.sort_unstable();
        assert_eq!(at, vec![3_000, 4_000, 5_000]);
        // An exited candidate is forgotten; a candidate no longer wanted too.
        drop(idle);
        t.sample(&pids, 6_000);
        assert!(t.watch.is_empty(), "{:?}", t.watch);
    }

    /// A shell that does nothing until told, then writes one line (its I/O counters move)
    /// and waits for its input to close.
    struct Writer(std::process::Child);

    impl Writer {
        fn start() -> Self {
            let child = std::process::Command::new("sh")
                .args(["-c", "read x; echo moved; read y"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("sh");
            Self(child)
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }

        /// Waits until it has finished starting (its mark moves while it loads).
        fn settle(&self) {
            let mut prev = None;
            let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let dir = Path::new("/proc").join(self.pid().to_string());
                let mark = HeldFiles::open(&dir).expect("held").mark();
                if mark.is_some() && mark == prev {
                    return;
                }
                assert!(std::time::Instant::now() < until, "the shell never settled");
                prev = mark;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }

        /// Tells it to write, and waits for its line.
        fn write(&mut self) {
            use std::io::Write;
            let stdin = self.0.stdin.as_mut().expect("stdin");
            stdin.write_all(b"go\n").expect("write");
            let mut line = String::new();
            BufReader::new(self.0.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .expect("read");
            assert_eq!(line, "moved\n");
        }

        /// Closes its input and waits for it to exit.
        fn finish(&mut self) {
            drop(self.0.stdin.take());
            let _ = self.0.wait();
        }
    }

    impl Drop for Writer {
        fn drop(&mut self) {
            self.finish();
        }
    }

    /// A tracker of `/proc` rechecking every `recheck_secs`, still candidates marked every
    /// 4 s; `None` (the skip recorded as `test`) where no file can be held.
    fn still_tracker(recheck_secs: u64, test: &str) -> Option<Tracker> {
        let t = Tracker::new(Path::new("/proc"), 1024)
            .with_recheck_secs(recheck_secs)
            .with_idle_mark_secs(4);
        if t.held_max == 0 {
            crate::skipped::record(
                test,
                "no descriptor limit readable: every candidate is read in full",
            );
            return None;
        }
        Some(t)
    }

    #[test]
    fn candidates_due_together_keep_a_still_candidates_rhythm_until_their_recheck() {
        // Eight still candidates read together at 0 s, all due again at 80 s: one recheck
        // per sample (a round of eight per 80 s).
        let Some(mut t) = still_tracker(
            80,
            "collect::training::tests::candidates_due_together_keep_a_still_candidates_rhythm_until_their_recheck",
        ) else {
            return;
        };
        let children: Vec<Writer> = (0..8).map(|_| Writer::start()).collect();
        let pids: Vec<u32> = children.iter().map(Writer::pid).collect();
        for c in &children {
            c.settle();
        }
        for s in 0..80 {
            t.sample(&pids, s * 1_000);
        }
        assert!(
            pids.iter().all(|p| t.watch[p].read_ms == 0),
            "none read yet"
        );
        // Marked while waiting for its recheck, per candidate.
        let mut waiting_marks: HashMap<u32, u32> = HashMap::new();
        for s in 80..90 {
            t.sample(&pids, s * 1_000);
            for p in &pids {
                let w = &t.watch[p];
                if w.marked_ms == s * 1_000 && w.read_ms != s * 1_000 && w.read_ms == 0 {
                    *waiting_marks.entry(*p).or_default() += 1;
                }
            }
        }
        for p in &pids {
            let read = t.watch[p].read_ms;
            assert!(
                (80_000..88_000).contains(&read),
                "each one re-read within eight samples: {p} at {read}"
            );
        }
        // Waiting up to seven samples at a four-second rhythm: at most two marks each (each
        // used to be marked at every sample until its turn).
        assert!(
            waiting_marks.values().all(|&n| n <= 2),
            "marked while waiting: {waiting_marks:?}"
        );
    }

    #[test]
    fn a_candidate_still_for_half_a_minute_is_marked_less_often_until_it_moves() {
        let Some(mut t) = still_tracker(
            3600,
            "collect::training::tests::a_candidate_still_for_half_a_minute_is_marked_less_often_until_it_moves",
        ) else {
            return;
        };
        // A shell that writes a line when told: until then it does nothing at all.
        let mut child = Writer::start();
        let pid = child.pid();
        child.settle();
        t.sample(&[pid], 0);
        // Still for less than half a minute: marked at every sample.
        for s in 1..30 {
            t.sample(&[pid], s * 1_000);
            assert_eq!(t.watch[&pid].marked_ms, s * 1_000, "sample {s}");
        }
        // Still since: marked about every four seconds, never at two samples running; from
        // 32 s of stillness every eighth of it, up to four times four seconds.
        let mut marked = Vec::new();
        for s in 30..240 {
            t.sample(&[pid], s * 1_000);
            if t.watch[&pid].marked_ms == s * 1_000 {
                marked.push(s);
            }
        }
        let gaps: Vec<i64> = marked.windows(2).map(|w| w[1] - w[0]).collect();
        for (w, gap) in marked.windows(2).zip(&gaps) {
            // An eighth of the stillness between the two marks, four to sixteen seconds.
            let (low, high) = ((w[0] / 8).clamp(4, 16), (w[1] / 8).clamp(4, 16));
            assert!(
                (low..=high + 1).contains(gap),
                "marks {marked:?}: after {} s, {gap} s",
                w[0]
            );
        }
        assert!(
            gaps[0] <= 5,
            "half a minute still: about every four seconds ({marked:?})"
        );
        assert!(
            gaps.iter().rev().take(4).all(|&g| g == 16),
            "long still: every sixteen seconds ({marked:?})"
        );
        assert_eq!(
            t.watch[&pid].read_ms, 0,
            "nothing moved: its descriptors were not read"
        );
        // It writes: the next of those marks sees it (within four times idle_mark_secs),
        // reads it, and marks it at every sample again.
        child.write();
        let mut seen_at = None;
        for s in 240..257 {
            t.sample(&[pid], s * 1_000);
            if t.watch[&pid].read_ms == s * 1_000 {
                seen_at = Some(s);
                break;
            }
        }
        let seen_at = seen_at.expect("the write was seen within four times idle_mark_secs");
        for s in seen_at + 1..seen_at + 5 {
            t.sample(&[pid], s * 1_000);
            assert_eq!(t.watch[&pid].marked_ms, s * 1_000, "sample {s}");
        }
        // With idle_mark_secs = 1 (as before), a still candidate is marked at every sample.
        let mut every = Tracker::new(Path::new("/proc"), 1024)
            .with_recheck_secs(3600)
            .with_idle_mark_secs(1);
        for s in 0..40 {
            every.sample(&[pid], 200_000 + s * 1_000);
            assert_eq!(
                every.watch[&pid].marked_ms,
                200_000 + s * 1_000,
                "sample {s}"
            );
        }
        child.finish();
    }

    #[test]
    fn a_candidate_that_writes_moves_its_mark() {
        // A child writing to a pipe when told: its I/O counters move.
        let mut child = Writer::start();
        let pid = child.pid();
        let held = HeldFiles::open(&Path::new("/proc").join(pid.to_string())).expect("held");
        let before = held.mark().expect("mark");
        assert_eq!(held.mark(), Some(before));
        child.write();
        assert_ne!(held.mark(), Some(before));
        child.finish();
        assert_eq!(held.mark(), None, "an exited process has no mark");
    }

    #[test]
    fn a_small_dataset_file_is_below_the_floor() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("tiny.jsonl");
        fs::write(&data, b"{}\n").expect("write");
        let _f = fs::File::open(&data).expect("open");
        let mut t = Tracker::new(Path::new("/proc"), 1024);
        t.sample(&[std::process::id()], 1);
        // (A candidate that neither writes weights nor reads datasets keeps no record.)
        assert!(
            t.procs
                .get(&std::process::id())
                .is_none_or(|p| !p.datasets.contains_key(data.to_string_lossy().as_ref()))
        );
    }
}
