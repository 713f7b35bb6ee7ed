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
//! sample.
//!
//! Known limits: a checkpoint opened, written and closed between two samples is seen only
//! through its directory (a later checkpoint in the same directory caught open, or the first
//! one that is); paths are those the process sees, so a containerised trainer's outputs join the
//! inventory only where the container path is the inventory's path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use sov_proto::pb;

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

    /// Look at each candidate's open descriptors (and maps, for datasets) now.
    pub fn sample(&mut self, candidates: &[u32], now_ms: i64) {
        for &pid in candidates {
            let Some((name, start_ticks)) = self.stat(pid) else {
                continue;
            };
            if !self.procs.contains_key(&pid) && self.procs.len() >= MAX_RUNS * 4 {
                // Keep the writers; forget idle candidates first.
                self.procs.retain(|_, p| p.writer_since.is_some());
                if self.procs.len() >= MAX_RUNS * 4 {
                    continue;
                }
            }
            let p = self.procs.entry(pid).or_default();
            if p.start_ticks != start_ticks || p.ended {
                *p = Proc {
                    start_ticks,
                    name,
                    ..Proc::default()
                };
            }
            let floor = self.dataset_floor;
            let dir = self.proc_root.join(pid.to_string());
            scan_fds(&dir, floor, p, now_ms);
            if p.writer_since.is_some() || !p.datasets.is_empty() {
                scan_maps(&dir, floor, p);
            }
        }
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

fn scan_fds(dir: &Path, floor: u64, p: &mut Proc, now_ms: i64) {
    let Ok(entries) = fs::read_dir(dir.join("fd")) else {
        return;
    };
    for entry in entries.flatten().take(MAX_FDS_PER_PROCESS) {
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let bytes = target.as_os_str().as_bytes();
        if bytes.first() != Some(&b'/') {
            continue; // socket:, pipe:, anon_inode:
        }
        let path = target.to_string_lossy().into_owned();
        if is_weight_path(&path) {
            if open_for_writing(&dir.join("fdinfo").join(entry.file_name())) {
                p.writer_since.get_or_insert(now_ms);
                p.last_activity = now_ms;
                if let Some(parent) = target.parent()
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
            && let Ok(m) = fs::metadata(entry.path())
            && m.is_file()
            && m.len() >= floor
        {
            let slot = p.datasets.entry(path).or_insert((m.len(), format, false));
            slot.0 = m.len();
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

    #[test]
    fn a_small_dataset_file_is_below_the_floor() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("tiny.jsonl");
        fs::write(&data, b"{}\n").expect("write");
        let _f = fs::File::open(&data).expect("open");
        let mut t = Tracker::new(Path::new("/proc"), 1024);
        t.sample(&[std::process::id()], 1);
        let p = &t.procs[&std::process::id()];
        assert!(!p.datasets.contains_key(data.to_string_lossy().as_ref()));
    }
}
