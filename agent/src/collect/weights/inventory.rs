//! The node's weight file inventory: discovery → content sniffing → identity → physical
//! location → users → fingerprint, kept current by a background scanner thread, and handed to
//! the report builder as a full inventory or as the changes since the previous report.
//!
//! Files come from three places, deduplicated by (device, inode) in this order:
//! 1. the weight roots (configured, or the defaults that exist) in the agent's own mount
//!    namespace (`found_by = "root"`);
//! 2. the same roots inside every other mount namespace's filesystem (containers, pods), once
//!    per namespace, read through `/proc/<pid>/root` with links resolved inside the container
//!    (`"container-root"`);
//! 3. the files processes map or hold open, wherever they live (`"process"`): one pass over
//!    `/proc/<pid>/maps` and `fd/` ([`users::ProcessFilesCache`]: each process read again only when
//!    its mappings or descriptors can have changed) that also gives every
//!    file's users. Only files of at least `process_min_file_bytes` whose (device, inode) was
//!    never examined are sniffed, at most `max_new_files_per_scan` per scan; files that are not
//!    weights are remembered by (device, inode) and never read again. A file found this way
//!    stays listed while a process of its mount namespace can still reach it.
//!
//! A container's file is reported with its path inside the container (`container_path`), the
//! host path where the host can reach the same file (its overlay layer, its volume's source:
//! the file's device and inode then match the ones processes map), its storage from the
//! container's own mount table (an NFS volume is NFS and names its server), its container and
//! pod, and identity from the in-container layout, read through the container's root.
//!
//! Costs: a rescan of unchanged files only lists directories and stats files (no file is
//! opened); headers are read once per new or changed file; fingerprints are computed once per
//! (device, inode, size, mtime) and remembered across restarts in the hash cache.
//!
//! Fairness: fingerprinting runs in turns of at most one scan interval, in the order of
//! [`super::schedule`] (restricted models by the collector's hints, then small and new files,
//! sparse files last), a slice of a file at a time; the roots are scanned again between turns,
//! so no file, however large, keeps a new one from being found and hashed. A file being hashed
//! carries `hashing_percent`. The agent's own processes (same executable as this one, e.g. a
//! `sov-agent scan` running beside the agent) are never listed as users of a file.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sov_proto::pb;

use super::discover::{self, Candidate};
use super::formats::{self, Format, Parsed};
use super::hash::{self, HashCache, PartialHash, RateLimiter, Slice};
use super::identity::{self, Identifier, Identity, IdentitySource};
use super::lineage::Lineage;
use super::schedule::{self, Hint};
use super::storage::{self, MountTable};
use super::users::{self, FileUse, Interest};
use crate::collect::containers::{Containers, SOURCE_RUNTIME};
use crate::collect::namespaces;
use crate::collect::proctable::ProcTable;
use crate::config::WeightsConfig;

/// `WeightFile.found_by` of a file under a root in the agent's own namespace.
pub const FOUND_BY_ROOT: &str = "root";
/// `WeightFile.found_by` of a file under a root inside a container.
pub const FOUND_BY_CONTAINER_ROOT: &str = "container-root";
/// `WeightFile.found_by` of a file a process maps or holds open outside every root.
pub const FOUND_BY_PROCESS: &str = "process";
/// At most this many other mount namespaces have their roots searched per scan.
pub const MAX_CONTAINER_NAMESPACES: usize = 512;
/// Directory entries one container's roots walk examines at most.
pub const CONTAINER_WALK_MAX_FILES: usize = 100_000;
/// Bytes of a process's environment read to find its roots (`HF_HOME`, …).
pub const MAX_ENVIRON_BYTES: u64 = 1 << 20;
/// At most this many (device, inode) pairs known not to be weights are remembered.
pub const MAX_NOT_WEIGHTS: usize = 200_000;
/// Most header errors remembered for `scan` to show.
pub const MAX_ERRORS: usize = 100;
/// Hashing rate while the agent is over its resource budget, bytes per second.
pub const REDUCED_HASH_RATE: u64 = 10 * 1024 * 1024;
/// Share of the agent's CPU budget (`[budget] max_cpu_percent`) that fingerprinting may use;
/// the rest is left to sampling, discovery and reporting.
pub const HASH_BUDGET_SHARE: f64 = 0.5;
/// The budget never slows fingerprinting below this rate, bytes per second (a restricted
/// file must still be identified within minutes on a slow CPU).
pub const MIN_BUDGET_HASH_RATE: u64 = 4 * 1024 * 1024;
/// Slices shorter than this are not used to estimate the CPU cost of a byte (too noisy).
const MIN_COST_SAMPLE_BYTES: u64 = 1 << 20;
/// A listing of `/proc` made less than this long ago by another collector is reused (the
/// process table's listing mode).
pub const TABLE_MAX_AGE: Duration = Duration::from_secs(1);
/// File name of the fingerprint cache in the state directory.
pub const HASH_CACHE_FILE: &str = "hash-cache.json";

/// (device, inode, size, mtime ms): when unchanged, nothing about the file is read again.
type FileStamp = (u64, u64, u64, i64);

#[derive(Debug, Clone)]
struct Entry {
    stamp: FileStamp,
    file: pb::WeightFile,
    /// Where the agent reads the file (the path itself for a host file; through
    /// `/proc/<pid>/root` or a process's handle for a container's).
    read_path: PathBuf,
    /// Every (device, inode) naming this file: the file itself and, for a container's file
    /// reached through its overlay, the overlay's view of it (what `stat` of a descriptor gives).
    keys: Vec<(u64, u64)>,
    /// For a file found in a mount namespace: (namespace, path inside it).
    origin: Option<(u64, PathBuf)>,
    /// When this version of the file was found (newer files are hashed first among equals).
    found: Instant,
}

/// What the report builder takes: the whole inventory or the changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightUpdate {
    /// `files` is complete.
    pub full: bool,
    /// Files added or changed (all files when `full`).
    pub files: Vec<pb::WeightFile>,
    /// Paths gone since the previous update.
    pub removed: Vec<String>,
    /// For a full inventory, its generation: strictly increasing (Unix ms when taken, or one
    /// more than the previous one).
    pub generation: Option<u64>,
}

/// The shared inventory (scanner thread writes, report builder and scan read).
#[derive(Debug, Default)]
pub struct Inventory {
    entries: BTreeMap<String, Entry>,
    /// (mount namespace, path inside it) → key in `entries`.
    by_origin: HashMap<(u64, PathBuf), String>,
    /// Files whose content is not a weight format, by stamp (never sniffed again unchanged).
    not_weights: HashMap<(u64, u64), FileStamp>,
    changed: BTreeSet<String>,
    removed: BTreeSet<String>,
    last_full: Option<Instant>,
    errors: Vec<(String, String)>,
    scans: u64,
    /// Restricted-model hints from the collector (the hash order).
    hints: Vec<Hint>,
    /// The last full inventory's generation.
    generation: u64,
    /// [`WeightsHandle::user_pids`], kept until a file or its users change (`None`: to be
    /// gathered again). Asked twice a report (process sampling, training candidates); on a
    /// node of 300 servers mapping 20 files each, gathering and sorting the 6,000 users was
    /// 4 % of the whole agent's CPU.
    user_pids: Option<Vec<u32>>,
}

/// A handle on the inventory, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct WeightsHandle {
    inner: Arc<Mutex<Inventory>>,
    reduced: Arc<AtomicBool>,
    /// Directories searched besides the roots: where training runs write checkpoints.
    extra_roots: Arc<Mutex<Vec<PathBuf>>>,
}

/// At most this many extra roots (training output directories) are searched.
pub const MAX_EXTRA_ROOTS: usize = 64;

fn lock(m: &Mutex<Inventory>) -> MutexGuard<'_, Inventory> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl WeightsHandle {
    /// The update for the next report: everything when a full inventory is due (first report,
    /// then every `full_every`), else the changes since the previous call.
    pub fn take_update(&self, now: Instant, full_every: Duration) -> WeightUpdate {
        let mut inv = lock(&self.inner);
        if inv.scans == 0 {
            // Nothing scanned yet: sending an empty "full" inventory would mark every copy the
            // collector knows as removed.
            return WeightUpdate::default();
        }
        let full = inv
            .last_full
            .is_none_or(|t| now.duration_since(t) >= full_every);
        let update = if full {
            inv.last_full = Some(now);
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            inv.generation = unix_ms.max(inv.generation.saturating_add(1));
            WeightUpdate {
                full: true,
                files: inv.entries.values().map(|e| e.file.clone()).collect(),
                removed: vec![],
                generation: Some(inv.generation),
            }
        } else {
            let files = inv
                .changed
                .iter()
                .filter_map(|p| inv.entries.get(p).map(|e| e.file.clone()))
                .collect();
            WeightUpdate {
                full: false,
                files,
                removed: inv.removed.iter().cloned().collect(),
                generation: None,
            }
        };
        inv.changed.clear();
        inv.removed.clear();
        update
    }

    /// Every weight file known now.
    pub fn files(&self) -> Vec<pb::WeightFile> {
        lock(&self.inner)
            .entries
            .values()
            .map(|e| e.file.clone())
            .collect()
    }

    /// Files that looked like a weight format but could not be parsed, with the reason.
    pub fn errors(&self) -> Vec<(String, String)> {
        lock(&self.inner).errors.clone()
    }

    /// Every pid using some weight file.
    pub fn user_pids(&self) -> Vec<u32> {
        let mut inv = lock(&self.inner);
        if let Some(pids) = &inv.user_pids {
            return pids.clone();
        }
        let mut pids: Vec<u32> = inv
            .entries
            .values()
            .flat_map(|e| e.file.users.iter().map(|u| u.pid))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        inv.user_pids = Some(pids.clone());
        pids
    }

    /// Search these directories too from the next scan on (training runs' checkpoint
    /// directories, so that their outputs are identified and fingerprinted like any weight
    /// file); at most [`MAX_EXTRA_ROOTS`].
    pub fn set_extra_roots(&self, mut dirs: Vec<PathBuf>) {
        dirs.truncate(MAX_EXTRA_ROOTS);
        *self
            .extra_roots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = dirs;
    }

    fn extra_roots(&self) -> Vec<PathBuf> {
        self.extra_roots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Slow hashing down (the agent is over its budget) or back to the configured rate.
    pub fn set_reduced(&self, reduced: bool) {
        self.reduced.store(reduced, Ordering::Relaxed);
    }

    /// Replace the restricted-model hints (from the collector's ack); they order the hashing.
    pub fn set_hints(&self, hints: Vec<Hint>) {
        let mut inv = lock(&self.inner);
        if inv.hints != hints {
            tracing::info!(
                hints = hints.len(),
                "restricted-model hints from the collector"
            );
            inv.hints = hints;
        }
    }

    /// Send these files again in the next update (they were withheld from a report for size).
    pub fn requeue(&self, paths: &[String]) {
        let mut inv = lock(&self.inner);
        for p in paths {
            if inv.entries.contains_key(p) {
                inv.changed.insert(p.clone());
            }
        }
    }
}

/// Scans the roots and keeps the inventory current.
#[derive(Debug)]
pub struct WeightsScanner {
    cfg: WeightsConfig,
    handle: WeightsHandle,
    cache: HashCache,
    limiter: RateLimiter,
    proc_root: PathBuf,
    containers: Option<Containers>,
    /// Users gathered by the latest scan's process pass, for `refresh_users` to use at once.
    fresh_uses: Option<HashMap<(u64, u64), Vec<FileUse>>>,
    /// Fingerprints in progress, by path (at most [`schedule::MAX_PARTIALS`]).
    partials: HashMap<String, Box<PartialHash>>,
    /// (device, inode) of this process's executable: processes running it are the agent.
    self_exe: Option<(u64, u64)>,
    /// The live processes (shared with the agent's other collectors); `None`: list `/proc`.
    table: Option<ProcTable>,
    /// Every process's mount namespace, maps and descriptors, between scans.
    files: users::ProcessFilesCache,
    /// The agent's CPU budget, percent of one CPU, when fingerprinting must stay inside it.
    cpu_budget_percent: Option<f32>,
    /// What a fingerprinted byte costs in CPU here.
    hash_cost: HashCost,
}

/// A file found inside a mount namespace (a container's root, or through a process).
#[derive(Debug)]
struct NsItem {
    /// Mount namespace (the agent's own for a host process's file).
    mntns: u64,
    /// A process in it (for its root, its mount table and its container).
    pid: u32,
    /// Path inside the namespace.
    cpath: PathBuf,
    /// Where to read it.
    read_path: PathBuf,
    /// Paths read for the in-container layout (refs, manifests), below the container's root.
    layout_paths: Vec<PathBuf>,
    /// Other paths inside the namespace reaching it.
    aliases: Vec<PathBuf>,
    stamp: FileStamp,
    found_by: &'static str,
}

fn stamp_of(m: &std::fs::Metadata) -> FileStamp {
    (
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime()
            .saturating_mul(1000)
            .saturating_add(m.mtime_nsec() / 1_000_000),
    )
}

/// The environment of `pid` (bounded), as a lookup.
fn environ(proc_root: &Path, pid: u32) -> HashMap<String, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    if let Ok(f) = std::fs::File::open(proc_root.join(pid.to_string()).join("environ")) {
        let _ = f.take(MAX_ENVIRON_BYTES).read_to_end(&mut bytes);
    }
    bytes
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = std::str::from_utf8(kv).ok()?;
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// How strong an identity's source is, for sharing one across a model's shards.
fn source_rank(source: &str) -> u8 {
    match source {
        "hf-cache" => 6,
        "ollama-manifest" => 5,
        "gguf-metadata" => 4,
        "safetensors-metadata" => 3,
        "directory" => 2,
        "sha256" => 1,
        _ => 0,
    }
}

/// The measured CPU cost of fingerprinting one byte on this machine (reading and sha256),
/// a moving average over recent slices.
#[derive(Debug, Default, Clone, Copy)]
struct HashCost {
    ns_per_byte: Option<f64>,
}

impl HashCost {
    /// Accounts for one slice: `cpu_ns` of this thread's CPU spent on `bytes`.
    fn observe(&mut self, cpu_ns: u64, bytes: u64) {
        if bytes < MIN_COST_SAMPLE_BYTES || cpu_ns == 0 {
            return;
        }
        #[allow(clippy::cast_precision_loss)]
        let x = cpu_ns as f64 / bytes as f64;
        self.ns_per_byte = Some(self.ns_per_byte.map_or(x, |p| 0.7 * p + 0.3 * x));
    }

    /// The rate, bytes per second, at which fingerprinting uses `HASH_BUDGET_SHARE` of
    /// `max_cpu_percent`; `None` until a slice has been measured.
    fn budget_rate(&self, max_cpu_percent: f32) -> Option<u64> {
        let ns_per_byte = self.ns_per_byte.filter(|n| n.is_finite() && *n > 0.0)?;
        let cpu_ns_per_sec = 1e9 * f64::from(max_cpu_percent.max(0.0)) / 100.0 * HASH_BUDGET_SHARE;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rate = (cpu_ns_per_sec / ns_per_byte) as u64;
        Some(rate.max(MIN_BUDGET_HASH_RATE))
    }
}

/// CPU time this thread has used, nanoseconds (user and system: the reads count too).
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

fn configured_rate(cfg: &WeightsConfig) -> Option<u64> {
    (cfg.hash_rate_mb_per_sec > 0).then(|| cfg.hash_rate_mb_per_sec.saturating_mul(1_000_000))
}

fn comm(proc_root: &Path, pid: u32) -> String {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

fn format_code(f: Format) -> pb::WeightFormat {
    match f {
        Format::Safetensors => pb::WeightFormat::Safetensors,
        Format::Gguf => pb::WeightFormat::Gguf,
        Format::PytorchZip => pb::WeightFormat::PytorchZip,
        Format::Torchscript => pb::WeightFormat::Torchscript,
        Format::Pickle => pb::WeightFormat::Pickle,
        Format::Onnx => pb::WeightFormat::Onnx,
    }
}

/// The identity a file's own header claims (GGUF `general.name`), offered to the chain after
/// the cache layouts (Hugging Face, Ollama) and before the directory name.
fn header_identity(parsed: &Parsed) -> Option<Identity> {
    let meta = &parsed.header.metadata;
    if parsed.format != Format::Gguf {
        return None;
    }
    let name = meta.get("general.name").filter(|n| !n.is_empty())?;
    Some(Identity {
        model: name.clone(),
        source: IdentitySource::GgufMetadata,
        publisher: meta
            .get("general.organization")
            .cloned()
            .unwrap_or_default(),
        ..Default::default()
    })
}

impl WeightsScanner {
    /// A scanner publishing into `handle`; the hash cache lives in `state_dir`.
    pub fn new(cfg: WeightsConfig, state_dir: &Path, handle: WeightsHandle) -> Self {
        let limiter = RateLimiter::new(configured_rate(&cfg));
        let mut files = users::ProcessFilesCache::new(Path::new("/proc"));
        // A file found through a process is examined only from process_min_file_bytes up.
        files.set_min_mapped_bytes(cfg.process_min_file_bytes);
        Self {
            cache: HashCache::load(&state_dir.join(HASH_CACHE_FILE)),
            limiter,
            cfg,
            handle,
            proc_root: PathBuf::from("/proc"),
            containers: None,
            fresh_uses: None,
            partials: HashMap::new(),
            self_exe: std::fs::metadata("/proc/self/exe")
                .ok()
                .map(|m| (m.dev(), m.ino())),
            table: None,
            files,
            cpu_budget_percent: None,
            hash_cost: HashCost::default(),
        }
    }

    /// Keep fingerprinting within `HASH_BUDGET_SHARE` of this CPU budget (percent of one CPU),
    /// whatever `hash_rate_mb_per_sec` allows: the rate follows the measured CPU cost of a
    /// byte on this machine.
    pub fn with_cpu_budget(mut self, max_cpu_percent: f32) -> Self {
        self.cpu_budget_percent = Some(max_cpu_percent);
        self
    }

    /// Follow the processes through the agent's shared process table (no listing of `/proc`
    /// per scan where it has process events).
    pub fn with_table(mut self, table: ProcTable) -> Self {
        self.table = Some(table);
        self
    }

    /// Name the container (and pod) of every copy found in a container and of every user.
    pub fn with_containers(mut self, containers: Containers) -> Self {
        self.containers = Some(containers);
        self
    }

    /// The roots to search: configured, or the defaults that exist on this machine, plus the
    /// checkpoint directories of training runs outside them.
    pub fn roots(&self) -> Vec<PathBuf> {
        let mut roots = match &self.cfg.roots {
            Some(r) => r.clone(),
            None => discover::default_roots(&|k| std::env::var(k).ok(), Path::new("/")),
        };
        for extra in self.handle.extra_roots() {
            if !roots.iter().any(|r| extra.starts_with(r)) {
                roots.push(extra);
            }
        }
        roots
    }

    /// One pass: discover (roots, containers' roots, processes' files), sniff new or changed
    /// files, locate and identify them; users are gathered on the way, no hashing. Returns how
    /// many files found through processes and containers were left for the next pass (the
    /// scan's budget, `max_new_files_per_scan`, was spent).
    pub fn scan(&mut self) -> usize {
        let roots = self.roots();
        let walk = discover::walk(
            &roots,
            discover::DEFAULT_MAX_DEPTH,
            discover::DEFAULT_MAX_FILES,
        );
        let mut truncated = walk.truncated;
        // Built on first need only: a rescan where nothing changed reads no file at all.
        let mut identifier: Option<Identifier> = None;
        let mut mounts: Option<MountTable> = None;
        let known: HashMap<String, FileStamp> = {
            let inv = lock(&self.handle.inner);
            inv.entries
                .iter()
                .map(|(p, e)| (p.clone(), e.stamp))
                .collect()
        };
        let mut seen: HashSet<String> = HashSet::new();
        let mut fresh: Vec<Entry> = Vec::new();
        let mut not_weights: Vec<((u64, u64), FileStamp)> = Vec::new();
        let mut errors: Vec<(String, String)> = Vec::new();
        // Every (device, inode) listed this scan, for the dedup of the later sources.
        let mut claimed: HashSet<(u64, u64)> = HashSet::new();
        let mut live_keys: HashSet<(u64, u64)> = HashSet::new();
        for c in &walk.candidates {
            let path = c.path.to_string_lossy().into_owned();
            let stamp: FileStamp = (c.device, c.inode, c.size, c.mtime_unix_ms);
            seen.insert(path.clone());
            claimed.insert((c.device, c.inode));
            live_keys.insert((c.device, c.inode));
            if known.get(&path) == Some(&stamp) {
                continue;
            }
            if lock(&self.handle.inner)
                .not_weights
                .get(&(c.device, c.inode))
                == Some(&stamp)
            {
                continue;
            }
            match formats::parse_path(&c.real_path) {
                Ok(None) => not_weights.push(((c.device, c.inode), stamp)),
                Ok(Some(parsed)) => {
                    let ident = identifier.get_or_insert_with(Identifier::new);
                    let mounts = mounts.get_or_insert_with(|| {
                        MountTable::load().unwrap_or_else(|_| MountTable::parse(""))
                    });
                    let id = ident.identify_candidate(c, header_identity(&parsed));
                    let lineage = ident.lineage_candidate(
                        c,
                        parsed.format,
                        &parsed.header.metadata,
                        &id.model,
                    );
                    let mut file = describe(c, &parsed, id, mounts);
                    set_lineage(&mut file, lineage);
                    fresh.push(Entry {
                        stamp,
                        file,
                        read_path: c.real_path.clone(),
                        keys: vec![(c.device, c.inode)],
                        origin: None,
                        found: Instant::now(),
                    });
                }
                Err(e) => {
                    tracing::debug!(path = %path, error = %e, "weight file refused");
                    errors.push((path, e.to_string()));
                    not_weights.push(((c.device, c.inode), stamp));
                }
            }
        }

        // Inside other mount namespaces, then through processes.
        // The agent's own mount namespace, and the host's (pid 1's): they differ under systemd
        // (PrivateTmp, ProtectSystem) and in a DaemonSet; neither is a container.
        let own_mnt = namespaces::own(namespaces::MNT).unwrap_or(0);
        let host_mnt = namespaces::of_pid(&self.proc_root, 1, namespaces::MNT).unwrap_or(own_mnt);
        let by_mnt = if self.cfg.container_roots || self.cfg.process_files {
            // Each process's namespace, maps and descriptors, read again only where they can
            // have changed (users::ProcessFilesCache).
            let live = self.table.as_ref().map(|t| t.refresh(TABLE_MAX_AGE));
            let not_weights: HashSet<(u64, u64)> = lock(&self.handle.inner)
                .not_weights
                .keys()
                .copied()
                .collect();
            self.files
                .refresh(live.as_deref(), self.cfg.process_files, &|k| {
                    !not_weights.contains(&k)
                });
            self.files.by_mnt()
        } else {
            HashMap::new()
        };
        let mut items: Vec<NsItem> = Vec::new();
        if self.cfg.container_roots {
            truncated |= self.container_roots(&by_mnt, &[own_mnt, host_mnt], &mut items);
        }
        let mut ns = NsScan {
            own_mnt,
            host_mnt,
            own_mounts: None,
            mounts: HashMap::new(),
            identifier: identifier.unwrap_or_default(),
            budget: self.cfg.max_new_files_per_scan,
            over_budget: 0,
        };
        if self.cfg.process_files {
            // Files in containers' roots are found first: they keep their better paths.
            let (more, uses, met) = self.process_items(&by_mnt, own_mnt, host_mnt, &claimed);
            live_keys.extend(met);
            items.extend(more);
            self.fresh_uses = Some(uses);
        } else {
            self.fresh_uses = None;
        }
        for item in items {
            live_keys.insert((item.stamp.0, item.stamp.1));
            self.absorb_item(
                item,
                &mut ns,
                &known,
                &mut seen,
                &mut claimed,
                &mut fresh,
                &mut not_weights,
                &mut errors,
            );
        }
        if ns.over_budget > 0 {
            tracing::debug!(
                waiting = ns.over_budget,
                "files found through processes and containers left for the next scan"
            );
        }
        // Fingerprints already known (this run or a previous one) are filled in at once.
        for e in &mut fresh {
            if let Ok(m) = std::fs::metadata(&e.read_path) {
                e.file.allocated_bytes = m.blocks().saturating_mul(512);
                if let Some(sha) = self.cache.get(&hash::file_key(&m)) {
                    e.file.sha256 = sha;
                }
            }
            crate::bounds::bound_weight_file(&mut e.file);
        }
        let mut inv = lock(&self.handle.inner);
        inv.scans += 1;
        for (k, stamp) in not_weights {
            if inv.not_weights.len() < MAX_NOT_WEIGHTS {
                inv.not_weights.insert(k, stamp);
            }
        }
        for (path, e) in errors {
            if inv.errors.len() < MAX_ERRORS {
                inv.errors.push((path, e));
            }
        }
        for e in fresh {
            let path = e.file.path.clone();
            if let Some(o) = &e.origin {
                inv.by_origin.insert(o.clone(), path.clone());
            }
            inv.changed.insert(path.clone());
            inv.removed.remove(&path);
            inv.entries.insert(path, e);
            inv.user_pids = None;
        }
        if !truncated {
            let gone: Vec<String> = inv
                .entries
                .keys()
                .filter(|p| !seen.contains(*p))
                .cloned()
                .collect();
            for p in gone {
                if let Some(e) = inv.entries.remove(&p)
                    && let Some(o) = e.origin
                {
                    inv.by_origin.remove(&o);
                }
                inv.changed.remove(&p);
                inv.removed.insert(p);
                inv.user_pids = None;
            }
            inv.not_weights.retain(|k, _| live_keys.contains(k));
        }
        let grouped = group_shards(&mut inv.entries);
        inv.changed.extend(grouped);
        ns.over_budget
    }

    /// Passes until nothing is left over budget (at most `max_passes`): what a one-shot
    /// `sov-agent scan` does, so its answer does not depend on how many other large files
    /// happen to be mapped on the node. Returns the files still left after the last pass.
    pub fn scan_until_done(&mut self, max_passes: usize) -> usize {
        let mut left = self.scan();
        for _ in 1..max_passes {
            if left == 0 {
                break;
            }
            left = self.scan();
        }
        left
    }

    /// The roots inside every other mount namespace, as items; true when a walk was cut short.
    fn container_roots(
        &self,
        by_mnt: &HashMap<u64, Vec<u32>>,
        not_containers: &[u64],
        items: &mut Vec<NsItem>,
    ) -> bool {
        let mut truncated = false;
        let mut spaces: Vec<(&u64, &Vec<u32>)> = by_mnt
            .iter()
            .filter(|(ns, _)| !not_containers.contains(ns))
            .collect();
        spaces.sort_unstable_by_key(|(ns, _)| **ns);
        for (&mntns, pids) in spaces.into_iter().take(MAX_CONTAINER_NAMESPACES) {
            let Some(&pid) = pids.first() else {
                continue;
            };
            let confine = self.proc_root.join(pid.to_string()).join("root");
            let roots: Vec<PathBuf> = match &self.cfg.roots {
                Some(r) => r
                    .iter()
                    .filter_map(|r| discover::confined_resolve(&confine, r).ok())
                    .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()))
                    .collect(),
                None => {
                    let env = environ(&self.proc_root, pid);
                    discover::default_roots_confined(&|k| env.get(k).cloned(), &confine)
                }
            };
            if roots.is_empty() {
                continue;
            }
            let w = discover::walk_confined(
                &confine,
                &roots,
                discover::DEFAULT_MAX_DEPTH,
                CONTAINER_WALK_MAX_FILES,
            );
            truncated |= w.truncated;
            let inside = |p: &Path| -> Option<PathBuf> {
                Some(Path::new("/").join(p.strip_prefix(&confine).ok()?))
            };
            for c in w.candidates {
                let Some(cpath) = inside(&c.path) else {
                    continue;
                };
                let mut layout_paths = vec![c.path.clone()];
                layout_paths.extend(c.aliases.iter().cloned());
                layout_paths.push(c.real_path.clone());
                items.push(NsItem {
                    mntns,
                    pid,
                    aliases: c.aliases.iter().filter_map(|a| inside(a)).collect(),
                    cpath,
                    read_path: c.real_path,
                    layout_paths,
                    stamp: (c.device, c.inode, c.size, c.mtime_unix_ms),
                    found_by: FOUND_BY_CONTAINER_ROOT,
                });
            }
        }
        truncated
    }

    /// One pass over every process: the files outside what is already claimed (new ones, and
    /// the ones found through processes before that are still reachable), the users of every
    /// file, and every (device, inode) met.
    #[allow(clippy::type_complexity)]
    fn process_items(
        &mut self,
        by_mnt: &HashMap<u64, Vec<u32>>,
        own_mnt: u64,
        host_mnt: u64,
        claimed: &HashSet<(u64, u64)>,
    ) -> (
        Vec<NsItem>,
        HashMap<(u64, u64), Vec<FileUse>>,
        HashSet<(u64, u64)>,
    ) {
        let (entry_keys, not_weights, previous): (
            HashSet<(u64, u64)>,
            HashSet<(u64, u64)>,
            Vec<(u64, PathBuf, Vec<(u64, u64)>)>,
        ) = {
            let inv = lock(&self.handle.inner);
            (
                inv.entries
                    .values()
                    .flat_map(|e| e.keys.iter().copied())
                    .collect(),
                inv.not_weights.keys().copied().collect(),
                inv.entries
                    .values()
                    .filter(|e| e.file.found_by == FOUND_BY_PROCESS)
                    .filter_map(|e| e.origin.clone().map(|(n, p)| (n, p, e.keys.clone())))
                    .collect(),
            )
        };
        let min = self.cfg.process_min_file_bytes;
        let pf = self.files.files(&|key| {
            if claimed.contains(&key) || entry_keys.contains(&key) {
                Interest::User
            } else if not_weights.contains(&key) {
                Interest::Ignore
            } else {
                Interest::Candidate
            }
        });
        let mnt_of: HashMap<u32, u64> = by_mnt
            .iter()
            .flat_map(|(ns, pids)| pids.iter().map(move |p| (*p, *ns)))
            .collect();
        let mut items = Vec::new();
        let mut sighted: HashSet<(u64, PathBuf)> = HashSet::new();
        let mut sightings: Vec<_> = pf.sightings.iter().collect();
        // Likely weights first, shared libraries and build artefacts last: on a node where
        // hundreds of large libraries are mapped, a model is never left behind the scan's budget.
        sightings.sort_unstable_by_key(|(k, s)| (sniff_rank(&s.path), s.pid, **k));
        for (_, s) in sightings {
            let mntns = mnt_of.get(&s.pid).copied().unwrap_or(host_mnt);
            let root_path =
                (mntns != own_mnt).then(|| self.proc_root.join(s.pid.to_string()).join("root"));
            let through_root = match &root_path {
                Some(r) => r.join(s.path.strip_prefix("/").unwrap_or(&s.path)),
                None => s.path.clone(),
            };
            // The handle opens the very file; its path inside the namespace is a fallback.
            let Some((read_path, meta)) = [s.handle.clone(), through_root.clone()]
                .into_iter()
                .filter(|p| !(s.deleted && *p == through_root))
                .find_map(|p| std::fs::metadata(&p).ok().map(|m| (p, m)))
            else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            if meta.len() < min {
                continue;
            }
            sighted.insert((mntns, s.path.clone()));
            items.push(NsItem {
                mntns,
                pid: s.pid,
                cpath: s.path.clone(),
                read_path,
                layout_paths: vec![through_root],
                aliases: vec![],
                stamp: stamp_of(&meta),
                found_by: FOUND_BY_PROCESS,
            });
        }
        // Files found through processes before: still there while their namespace can reach
        // them (a model unmapped after loading still resides in the container).
        for (mntns, cpath, keys) in previous {
            if sighted.contains(&(mntns, cpath.clone())) {
                continue;
            }
            let Some(pid) = by_mnt.get(&mntns).and_then(|p| p.first().copied()) else {
                continue;
            };
            let path = if mntns == own_mnt {
                cpath.clone()
            } else {
                self.proc_root
                    .join(pid.to_string())
                    .join("root")
                    .join(cpath.strip_prefix("/").unwrap_or(&cpath))
            };
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !keys.contains(&(meta.dev(), meta.ino())) {
                continue;
            }
            items.push(NsItem {
                mntns,
                pid,
                cpath,
                read_path: path.clone(),
                layout_paths: vec![path],
                aliases: vec![],
                stamp: stamp_of(&meta),
                found_by: FOUND_BY_PROCESS,
            });
        }
        (items, pf.uses, pf.seen)
    }

    /// One file of a namespace: unchanged (kept), a duplicate of a file already listed (an
    /// alias), or new (sniffed within the scan's budget, located, identified).
    #[allow(clippy::too_many_arguments)]
    fn absorb_item(
        &self,
        item: NsItem,
        ns: &mut NsScan,
        known: &HashMap<String, FileStamp>,
        seen: &mut HashSet<String>,
        claimed: &mut HashSet<(u64, u64)>,
        fresh: &mut Vec<Entry>,
        not_weights: &mut Vec<((u64, u64), FileStamp)>,
        errors: &mut Vec<(String, String)>,
    ) {
        let key = (item.stamp.0, item.stamp.1);
        // Unchanged since the previous scan: nothing is read.
        let previous = {
            let inv = lock(&self.handle.inner);
            inv.by_origin
                .get(&(item.mntns, item.cpath.clone()))
                .and_then(|p| inv.entries.get(p).map(|e| (p.clone(), e.keys.clone())))
        };
        if let Some((path, keys)) = &previous
            && known.get(path) == Some(&item.stamp)
        {
            seen.insert(path.clone());
            claimed.extend(keys.iter().copied());
            // The process it was read through may be gone: read it through this one now.
            if let Some(e) = lock(&self.handle.inner).entries.get_mut(path) {
                e.read_path = item.read_path;
            }
            return;
        }
        if claimed.contains(&key) {
            return;
        }
        if lock(&self.handle.inner).not_weights.get(&key) == Some(&item.stamp) {
            return;
        }
        if ns.budget == 0 {
            ns.over_budget += 1;
            return;
        }
        ns.budget -= 1;
        // The agent's own namespace: paths resolve here; the host's: its paths are host paths.
        let agents = item.mntns == ns.own_mnt;
        let own = item.mntns == ns.host_mnt;
        // Where the file lives: the namespace's own mount table.
        let table = ns.mounts_of(&self.proc_root, item.mntns, item.pid);
        let mount = if agents {
            table.locate(&item.cpath, Some(key.0)).cloned()
        } else {
            table.locate_in_namespace(&item.cpath, Some(key.0)).cloned()
        };
        let host = if own {
            Some((item.cpath.clone(), key))
        } else {
            let own_table = ns.own_table();
            mount.as_ref().and_then(|m| {
                storage::host_path(m, &item.cpath, own_table, &|p| {
                    std::fs::symlink_metadata(p)
                        .ok()
                        .filter(std::fs::Metadata::is_file)
                        .map(|m| (m.dev(), m.ino()))
                })
            })
        };
        let mut keys = vec![];
        if let Some((_, k)) = &host {
            keys.push(*k);
        }
        if !keys.contains(&key) {
            keys.push(key);
        }
        if keys.iter().any(|k| claimed.contains(k)) {
            // The same file, listed already (a host root, or another container of one image).
            return;
        }
        let container = if own {
            None
        } else {
            self.containers.as_ref().and_then(|c| c.of_pid(item.pid))
        };
        let wire_path = match &host {
            Some((p, _)) => p.to_string_lossy().into_owned(),
            None => format!(
                "container:{}:{}",
                container
                    .as_ref()
                    .map(|c| c.id.clone())
                    .filter(|id| !id.is_empty())
                    .unwrap_or_else(|| format!("mntns-{}", item.mntns)),
                item.cpath.display()
            ),
        };
        seen.insert(wire_path.clone());
        claimed.extend(keys.iter().copied());
        if let Some((path, _)) = previous
            && path != wire_path
        {
            // Its host path changed (a layer appeared or went): the old name is gone.
            seen.remove(&path);
        }
        match formats::parse_path(&item.read_path) {
            Ok(None) => not_weights.push((key, item.stamp)),
            Ok(Some(parsed)) => {
                let layout: Vec<&Path> = item.layout_paths.iter().map(PathBuf::as_path).collect();
                let id = ns
                    .identifier
                    .identify_at(&layout, &item.cpath, header_identity(&parsed));
                let lineage = ns.identifier.lineage(
                    &layout,
                    parsed.format,
                    &parsed.header.metadata,
                    &id.model,
                );
                let c = Candidate {
                    path: PathBuf::from(&wire_path),
                    real_path: item.read_path.clone(),
                    device: keys[0].0,
                    inode: keys[0].1,
                    size: item.stamp.2,
                    mtime_unix_ms: item.stamp.3,
                    root: PathBuf::new(),
                    aliases: vec![],
                };
                let mut file = describe_at(&c, &parsed, id, mount.as_ref());
                set_lineage(&mut file, lineage);
                if !own {
                    file.container_path = item.cpath.to_string_lossy().into_owned();
                    file.mntns_inode = item.mntns;
                    file.container = container;
                }
                file.host_path_known = host.is_some();
                file.found_by = item.found_by.to_owned();
                file.aliases = item
                    .aliases
                    .iter()
                    .map(|a| {
                        if own {
                            a.to_string_lossy().into_owned()
                        } else {
                            format!("container:{}", a.display())
                        }
                    })
                    .collect();
                fresh.push(Entry {
                    stamp: item.stamp,
                    file,
                    read_path: item.read_path,
                    keys,
                    origin: Some((item.mntns, item.cpath)),
                    found: Instant::now(),
                });
            }
            Err(e) => {
                tracing::debug!(path = %wire_path, error = %e, "weight file refused");
                errors.push((wire_path, e.to_string()));
                not_weights.push((key, item.stamp));
            }
        }
    }

    /// Which processes have each file open or mapped (from the latest scan's process pass when
    /// there was one since the previous call, else from a pass of its own); and the container
    /// of each copy found while no runtime had described it, once one does (the copy is sent
    /// again with its pod and image).
    pub fn refresh_users(&mut self) {
        let (wanted, cgroup_only) = {
            let inv = lock(&self.handle.inner);
            let wanted: HashSet<(u64, u64)> = inv
                .entries
                .values()
                .flat_map(|e| e.keys.iter().copied())
                .collect();
            // Copies found in a container while no runtime had described it yet.
            let cgroup_only: Vec<(String, pb::ContainerRef)> = inv
                .entries
                .iter()
                .filter_map(|(p, e)| {
                    e.file
                        .container
                        .as_ref()
                        .filter(|c| c.source != SOURCE_RUNTIME)
                        .map(|c| (p.clone(), c.clone()))
                })
                .collect();
            (wanted, cgroup_only)
        };
        let mut described: HashMap<String, pb::ContainerRef> = match &self.containers {
            Some(dir) => cgroup_only
                .into_iter()
                .filter_map(|(p, c)| dir.runtime_record(&c).map(|r| (p, r)))
                .collect(),
            None => HashMap::new(),
        };
        let fresh = self.fresh_uses.take();
        if wanted.is_empty() {
            return;
        }
        let uses = match fresh {
            Some(u) => u,
            None => users::scan_users(&self.proc_root, &wanted),
        };
        let mut names: HashMap<u32, String> = HashMap::new();
        let mut all_pids: Vec<u32> = uses.values().flatten().map(|u| u.pid).collect();
        all_pids.sort_unstable();
        all_pids.dedup();
        let containers = self
            .containers
            .as_ref()
            .map(|c| c.of_pids(&all_pids))
            .unwrap_or_default();
        let mut agent: HashMap<u32, bool> = HashMap::new();
        let (proc_root, self_exe) = (&self.proc_root, self.self_exe);
        let mut is_agent = |pid: u32| {
            *agent.entry(pid).or_insert_with(|| {
                pid == std::process::id()
                    || self_exe.is_some_and(|k| {
                        std::fs::metadata(proc_root.join(pid.to_string()).join("exe"))
                            .is_ok_and(|m| (m.dev(), m.ino()) == k)
                    })
            })
        };
        let mut inv = lock(&self.handle.inner);
        let mut changed = Vec::new();
        let mut users_moved = false;
        for (path, e) in inv.entries.iter_mut() {
            if let Some(r) = described.remove(path) {
                e.file.container = Some(r);
                changed.push(path.clone());
            }
            let mut by_pid: BTreeMap<u32, (bool, bool)> = BTreeMap::new();
            for k in &e.keys {
                for u in uses
                    .get(k)
                    .into_iter()
                    .flatten()
                    .filter(|u| !is_agent(u.pid))
                {
                    let slot = by_pid.entry(u.pid).or_default();
                    slot.0 |= u.mapped;
                    slot.1 |= u.open;
                }
            }
            for pid in by_pid.keys() {
                names
                    .entry(*pid)
                    .or_insert_with(|| comm(&self.proc_root, *pid));
            }
            // Compared before anything is built: a user is some 80 bytes (its container
            // boxed), and a steady node's users do not change from one scan to the next.
            let same = by_pid.len() == e.file.users.len()
                && by_pid
                    .iter()
                    .zip(&e.file.users)
                    .all(|((pid, (mapped, open)), u)| {
                        u.pid == *pid
                            && u.mapped == *mapped
                            && u.open == *open
                            && u.gpu_uuids.is_empty()
                            && names.get(pid).is_some_and(|n| *n == u.process)
                            && u.container.as_deref() == containers.get(pid)
                    });
            if same {
                continue;
            }
            let now: Vec<pb::WeightUser> = by_pid
                .into_iter()
                .map(|(pid, (mapped, open))| pb::WeightUser {
                    pid,
                    process: names.get(&pid).cloned().unwrap_or_default(),
                    mapped,
                    open,
                    gpu_uuids: vec![],
                    container: containers.get(&pid).cloned().map(Box::new),
                })
                .collect();
            if now != e.file.users {
                e.file.open_by_pids = now.iter().map(|u| u.pid).collect();
                e.file.users = now;
                changed.push(path.clone());
                users_moved = true;
            }
        }
        if users_moved {
            inv.user_pids = None;
        }
        inv.changed.extend(changed);
    }

    /// Fingerprint every file that has no sha256 yet, at the configured rate, until `cancel`.
    /// `progress(path, done, total)` is called as bytes are read.
    pub fn hash_pending(&mut self, cancel: &AtomicBool, progress: &mut dyn FnMut(&str, u64, u64)) {
        self.hash_until(None, cancel, progress);
    }

    /// One turn of fingerprinting: files without a sha256 in [`schedule::priority`] order, a
    /// slice at a time, until `deadline` (`None`: until every file is done), `cancel`, or
    /// nothing is left. Returns true when files are still waiting.
    pub fn hash_until(
        &mut self,
        deadline: Option<Instant>,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(&str, u64, u64),
    ) -> bool {
        let queue: Vec<(String, PathBuf, u64)> = {
            let inv = lock(&self.handle.inner);
            let now = Instant::now();
            let mut q: Vec<(schedule::Priority, String, PathBuf, u64)> = inv
                .entries
                .values()
                // A download in progress changes under the hash: fingerprinted once whole.
                .filter(|e| e.file.sha256.is_empty() && !e.file.incomplete)
                .map(|e| {
                    let done = self.partials.get(&e.file.path).map_or(0, |p| p.done);
                    let p = schedule::priority(
                        &e.file,
                        done,
                        now.saturating_duration_since(e.found),
                        &inv.hints,
                    );
                    (
                        p,
                        e.file.path.clone(),
                        e.read_path.clone(),
                        e.file.size_bytes,
                    )
                })
                .collect();
            q.sort();
            q.into_iter()
                .map(|(_, key, path, size)| (key, path, size))
                .collect()
        };
        let past = |d: Option<Instant>| d.is_some_and(|d| Instant::now() >= d);
        let mut hashed = 0usize;
        let mut left = false;
        for (key, path, size) in queue {
            if cancel.load(Ordering::Relaxed) || past(deadline) {
                left = true;
                break;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if let Some(sha) = self.cache.get(&hash::file_key(&meta)) {
                self.finish(&key, hash::file_key(&meta), sha);
                continue;
            }
            // Slices until the file is done or the turn is over.
            loop {
                let rate = self.current_rate();
                self.limiter.set_rate(rate);
                let partial = self.partials.remove(&key);
                let start_done = partial.as_ref().map_or(0, |p| p.done);
                let mut end_done = start_done;
                let cpu_before = thread_cpu_ns();
                let slice = hash::sha256_slice(
                    &path,
                    partial,
                    schedule::slice_bytes(rate),
                    &mut self.limiter,
                    cancel,
                    &mut |done| {
                        end_done = done;
                        progress(&key, done, size);
                    },
                );
                self.hash_cost.observe(
                    thread_cpu_ns().saturating_sub(cpu_before),
                    end_done.saturating_sub(start_done),
                );
                match slice {
                    // Cached under the key of the file actually read (it may have been
                    // replaced since the stat above).
                    Ok(Slice::Done(k, sha)) => {
                        self.cache.insert(k, sha.clone());
                        hashed += 1;
                        self.finish(&key, k, sha);
                        break;
                    }
                    Ok(Slice::Partial(p)) => {
                        self.note_progress(&key, &p);
                        self.keep_partial(key.clone(), p);
                        if cancel.load(Ordering::Relaxed) || past(deadline) {
                            left = true;
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(path = %key, error = %e, "fingerprint skipped");
                        break;
                    }
                }
            }
            if left {
                break;
            }
        }
        if hashed > 0
            && let Err(e) = self.cache.save()
        {
            tracing::warn!(error = %e, "cannot save the fingerprint cache");
        }
        left
    }

    fn current_rate(&self) -> Option<u64> {
        let configured = configured_rate(&self.cfg);
        if self.handle.reduced.load(Ordering::Relaxed) {
            return Some(configured.map_or(REDUCED_HASH_RATE, |r| r.min(REDUCED_HASH_RATE)));
        }
        let budget = self
            .cpu_budget_percent
            .and_then(|pct| self.hash_cost.budget_rate(pct));
        match (configured, budget) {
            (Some(c), Some(b)) => Some(c.min(b)),
            (c, b) => c.or(b),
        }
    }

    /// Records a finished fingerprint on the entry, when the file hashed is the one the entry
    /// describes (a replaced file is described, and hashed from the cache, at the next scan).
    fn finish(&mut self, key: &str, fkey: hash::FileKey, sha: String) {
        self.partials.remove(key);
        let mut inv = lock(&self.handle.inner);
        if let Some(e) = inv.entries.get_mut(key).filter(|e| {
            e.keys.contains(&(fkey.device, fkey.inode)) && e.file.size_bytes == fkey.size
        }) {
            e.file.sha256 = sha;
            e.file.hashing_percent = None;
            inv.changed.insert(key.to_owned());
        }
    }

    /// Shows a half-hashed file's progress; reported again at each tenth.
    fn note_progress(&mut self, key: &str, p: &PartialHash) {
        let pct = u32::try_from(
            (p.done.saturating_mul(100))
                .checked_div(p.key.size)
                .unwrap_or(0),
        )
        .unwrap_or(99)
        .min(99);
        let mut inv = lock(&self.handle.inner);
        if let Some(e) = inv.entries.get_mut(key) {
            let before = e.file.hashing_percent;
            e.file.hashing_percent = Some(pct);
            if before.is_none_or(|b| b / 10 != pct / 10) {
                inv.changed.insert(key.to_owned());
            }
        }
    }

    fn keep_partial(&mut self, key: String, p: Box<PartialHash>) {
        if self.partials.len() >= schedule::MAX_PARTIALS
            && let Some(least) = self
                .partials
                .iter()
                .min_by_key(|(_, q)| q.done)
                .map(|(k, _)| k.clone())
        {
            self.partials.remove(&least);
        }
        self.partials.insert(key, p);
    }

    /// Scan, hash for the rest of the interval, scan again; until `cancel`. Runs on its own
    /// thread. A long hash never delays the next scan by more than one slice.
    pub fn run(mut self, cancel: Arc<AtomicBool>) {
        let interval = Duration::from_secs(self.cfg.scan_interval_secs);
        while !cancel.load(Ordering::Relaxed) {
            let started = Instant::now();
            self.scan();
            self.refresh_users();
            let until = started + interval;
            let left = self.hash_until(Some(until), &cancel, &mut |_, _, _| {});
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                waiting = left,
                "weights scan done"
            );
            while Instant::now() < until && !cancel.load(Ordering::Relaxed) {
                std::thread::sleep(
                    Duration::from_millis(1000)
                        .min(until.saturating_duration_since(Instant::now())),
                );
            }
        }
    }

    /// The handle this scanner publishes into.
    pub fn handle(&self) -> WeightsHandle {
        self.handle.clone()
    }
}

fn describe(c: &Candidate, parsed: &Parsed, id: Identity, mounts: &MountTable) -> pb::WeightFile {
    let mount = mounts.locate(&c.real_path, Some(c.device)).cloned();
    let mut f = describe_at(c, parsed, id, mount.as_ref());
    f.found_by = FOUND_BY_ROOT.to_owned();
    f.host_path_known = true;
    f
}

/// The wire description of a parsed file whose mount (in its own namespace) is `mount`.
fn describe_at(
    c: &Candidate,
    parsed: &Parsed,
    id: Identity,
    mount: Option<&storage::Mount>,
) -> pb::WeightFile {
    let file_name = c
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (shard_index, shard_count, shard_set) = match identity::shard_of(&file_name) {
        Some((i, n, base)) => {
            let dir = c
                .path
                .parent()
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default();
            (i, n, format!("{dir}/{base}"))
        }
        None => (0, 0, String::new()),
    };
    let storage = mount.map(storage::location).unwrap_or_default();
    let declared = parsed.header.declared_len.unwrap_or(0);
    pb::WeightFile {
        path: c.path.to_string_lossy().into_owned(),
        format: format_code(parsed.format) as i32,
        size_bytes: c.size,
        mtime_unix_ms: c.mtime_unix_ms,
        device: c.device,
        inode: c.inode,
        identity: Some(pb::ModelIdentity {
            model: id.model,
            revision: id.revision,
            refs: id.refs,
            repo_path: id.repo_path,
            source: id.source.as_str().to_owned(),
            publisher: id.publisher,
            ..Default::default()
        }),
        storage: Some(storage),
        tensor_count: parsed.header.tensor_count,
        parameter_count: parsed.header.parameter_count.unwrap_or(0),
        dtypes: parsed.header.dtypes.clone(),
        metadata: parsed
            .header
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        shard_set,
        shard_index,
        shard_count,
        aliases: c
            .aliases
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        incomplete: declared > c.size,
        declared_size_bytes: declared,
        ..Default::default()
    }
}

/// Carry what the file declares about its bases in its wire identity.
fn set_lineage(file: &mut pb::WeightFile, lineage: Lineage) {
    let id = file.identity.get_or_insert_with(Default::default);
    id.adapter_type = lineage.adapter_type;
    id.base_models = lineage
        .base_models
        .into_iter()
        .map(|b| pb::BaseModel {
            name: b.name,
            organization: b.organization,
            repo_url: b.repo_url,
            source: b.source.as_str().to_owned(),
        })
        .collect();
}

/// The shards of one model (same `shard_set`) share the strongest identity any of them has
/// (llama.cpp writes `general.name` and `general.base_model.*` into the first split only), and
/// its declared bases when they have none: returns the paths changed.
fn group_shards(entries: &mut BTreeMap<String, Entry>) -> Vec<String> {
    let mut best: HashMap<String, pb::ModelIdentity> = HashMap::new();
    for e in entries.values() {
        let Some(id) = &e.file.identity else {
            continue;
        };
        if e.file.shard_set.is_empty() {
            continue;
        }
        let slot = best
            .entry(e.file.shard_set.clone())
            .or_insert_with(|| id.clone());
        if source_rank(&id.source) > source_rank(&slot.source) {
            let bases = std::mem::take(&mut slot.base_models);
            *slot = id.clone();
            if slot.base_models.is_empty() {
                slot.base_models = bases;
            }
        } else if slot.base_models.is_empty() && !id.base_models.is_empty() {
            slot.base_models.clone_from(&id.base_models);
        }
    }
    let mut changed = Vec::new();
    for (path, e) in entries.iter_mut() {
        let Some(b) = best.get(&e.file.shard_set) else {
            continue;
        };
        let id = e.file.identity.get_or_insert_with(Default::default);
        if source_rank(&b.source) > source_rank(&id.source) {
            id.model.clone_from(&b.model);
            id.revision.clone_from(&b.revision);
            id.refs.clone_from(&b.refs);
            id.source.clone_from(&b.source);
            id.publisher.clone_from(&b.publisher);
            if id.base_models.is_empty() {
                id.base_models.clone_from(&b.base_models);
            }
            changed.push(path.clone());
        } else if id.base_models.is_empty() && !b.base_models.is_empty() {
            id.base_models.clone_from(&b.base_models);
            changed.push(path.clone());
        }
    }
    changed
}

/// The order in which files found through processes are sniffed: names of weight formats
/// first, then anything else, then shared libraries and compiler artefacts (mapped by almost
/// every process, never weights).
pub(crate) fn sniff_rank(path: &Path) -> u8 {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    const WEIGHTS: &[&str] = &[
        ".safetensors",
        ".gguf",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".onnx",
        ".pkl",
        ".model",
    ];
    const NEVER: &[&str] = &[".rlib", ".rmeta", ".a", ".jar", ".pyc", ".ttf", ".otf"];
    if WEIGHTS.iter().any(|e| name.ends_with(e)) || name.starts_with("sha256-") {
        0
    } else if name.ends_with(".so")
        || name.contains(".so.")
        || NEVER.iter().any(|e| name.ends_with(e))
    {
        2
    } else {
        1
    }
}

/// The per-scan caches of the namespace sources.
#[derive(Debug)]
struct NsScan {
    /// The agent's own mount namespace.
    own_mnt: u64,
    /// The host's (pid 1's; the agent's own when pid 1 cannot be read).
    host_mnt: u64,
    own_mounts: Option<MountTable>,
    /// Each other namespace's mount table, read once per scan.
    mounts: HashMap<u64, MountTable>,
    identifier: Identifier,
    /// New files that may still be sniffed this scan.
    budget: usize,
    /// New files left for the next scan.
    over_budget: usize,
}

impl NsScan {
    fn own_table(&mut self) -> &MountTable {
        self.own_mounts
            .get_or_insert_with(|| MountTable::load().unwrap_or_else(|_| MountTable::parse("")))
    }

    fn mounts_of(&mut self, proc_root: &Path, mntns: u64, pid: u32) -> &MountTable {
        if mntns == self.own_mnt {
            return self.own_table();
        }
        self.mounts.entry(mntns).or_insert_with(|| {
            MountTable::load_from(&proc_root.join(pid.to_string()).join("mountinfo"))
                .unwrap_or_else(|_| MountTable::parse(""))
        })
    }
}

/// Fill each user's GPUs from the latest GPU report (pid → device uuids).
pub fn link_gpus(files: &mut [pb::WeightFile], gpus: &[pb::GpuSample]) {
    let mut by_pid: HashMap<u32, Vec<String>> = HashMap::new();
    for d in gpus {
        for p in &d.processes {
            let id = if p.mig_uuid.is_empty() {
                d.uuid.clone()
            } else {
                p.mig_uuid.clone()
            };
            by_pid.entry(p.pid).or_default().push(id);
        }
    }
    for f in files {
        for u in &mut f.users {
            u.gpu_uuids = by_pid.get(&u.pid).cloned().unwrap_or_default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Entry, HashCost, Instant, MIN_BUDGET_HASH_RATE, WeightsHandle, WeightsScanner, lock,
        sniff_rank, thread_cpu_ns,
    };
    use crate::collect::containers::{Containers, SOURCE_CGROUP, SOURCE_RUNTIME};
    use crate::config::{ContainersConfig, WeightsConfig};
    use sov_proto::pb;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::time::Duration;

    /// An entry for the file at `read_path`, as a scan of the host's roots would leave it.
    fn entry(read_path: &Path, container: Option<pb::ContainerRef>) -> Entry {
        let meta = std::fs::metadata(read_path).expect("stat");
        Entry {
            stamp: (meta.dev(), meta.ino(), meta.len(), 0),
            file: pb::WeightFile {
                path: read_path.to_string_lossy().into_owned(),
                container,
                ..Default::default()
            },
            read_path: read_path.to_owned(),
            keys: vec![(meta.dev(), meta.ino())],
            origin: None,
            found: Instant::now(),
        }
    }

    #[test]
    fn the_users_pids_follow_a_process_that_opens_and_one_that_exits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("w.safetensors");
        std::fs::write(&file, b"weights").expect("write");
        let handle = WeightsHandle::default();
        let mut scanner = WeightsScanner::new(WeightsConfig::default(), dir.path(), handle.clone());
        lock(&handle.inner)
            .entries
            .insert(file.to_string_lossy().into_owned(), entry(&file, None));
        scanner.refresh_users();
        assert_eq!(handle.user_pids(), Vec::<u32>::new(), "nobody holds it");
        // A process holding it open (its standard input).
        struct Reaped(std::process::Child);
        impl Drop for Reaped {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let child = Reaped(
            std::process::Command::new("sleep")
                .arg("600")
                .stdin(std::fs::File::open(&file).expect("open"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("sleep"),
        );
        let pid = child.0.id();
        scanner.refresh_users();
        assert_eq!(handle.user_pids(), vec![pid], "the holder, at once");
        assert_eq!(handle.user_pids(), vec![pid], "asked again: the same");
        drop(child);
        scanner.refresh_users();
        assert_eq!(handle.user_pids(), Vec::<u32>::new(), "the holder exited");
    }

    #[test]
    fn a_copy_found_before_the_runtime_answered_is_named_with_its_pod_once_it_does() {
        const ID: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";
        let dir = tempfile::tempdir().expect("tempdir");
        let read_path = dir.path().join("w.safetensors");
        std::fs::write(&read_path, b"weights").expect("write");
        let handle = WeightsHandle::default();
        let containers = Containers::new(ContainersConfig::default(), Path::new("/proc"));
        let mut scanner = WeightsScanner::new(WeightsConfig::default(), dir.path(), handle.clone())
            .with_containers(containers.clone());
        let path = format!("container:{ID}:/models/w.safetensors");
        {
            // What the cgroup alone said when the copy was found.
            let mut e = entry(
                &read_path,
                Some(pb::ContainerRef {
                    id: ID.into(),
                    runtime: "containerd".into(),
                    pod_uid: "uid-7".into(),
                    source: SOURCE_CGROUP.into(),
                    ..Default::default()
                }),
            );
            e.file.path.clone_from(&path);
            e.file.container_path = "/models/w.safetensors".into();
            let mut inv = lock(&handle.inner);
            inv.entries.insert(path.clone(), e);
            inv.scans = 1;
        }
        let every = Duration::from_secs(3600);
        scanner.refresh_users();
        let first = handle.take_update(Instant::now(), every);
        assert!(first.full, "the first update is the whole inventory");
        scanner.refresh_users();
        assert_eq!(
            handle.take_update(Instant::now(), every).files,
            vec![],
            "no runtime lists it yet: nothing to send again"
        );

        containers.remember(pb::ContainerRef {
            id: ID.into(),
            runtime: "containerd".into(),
            image: "registry.invalid/models/llm:1".into(),
            pod_name: "llm-0".into(),
            pod_namespace: "serving".into(),
            container_name: "server".into(),
            source: SOURCE_RUNTIME.into(),
            ..Default::default()
        });
        scanner.refresh_users();
        let update = handle.take_update(Instant::now(), every);
        assert!(!update.full);
        let sent: Vec<&pb::WeightFile> = update.files.iter().filter(|f| f.path == path).collect();
        assert_eq!(sent.len(), 1, "the copy is sent again: {update:?}");
        let c = sent[0].container.as_ref().expect("its container");
        assert_eq!(
            (
                c.source.as_str(),
                c.pod_name.as_str(),
                c.pod_namespace.as_str(),
                c.image.as_str(),
                c.pod_uid.as_str()
            ),
            (
                SOURCE_RUNTIME,
                "llm-0",
                "serving",
                "registry.invalid/models/llm:1",
                "uid-7"
            ),
            "the runtime's record, the cgroup's pod uid kept"
        );
    }

    #[test]
    fn the_hash_rate_follows_the_measured_cost_of_a_byte_and_the_cpu_budget() {
        let mut cost = HashCost::default();
        assert_eq!(cost.budget_rate(5.0), None, "nothing measured yet");
        // Too short a slice says nothing.
        cost.observe(1_000, 1_000);
        assert_eq!(cost.budget_rate(5.0), None);
        // 0.5 ns per byte (2 GB per CPU-second): half of 5 % of a CPU is 25 ms per second,
        // which hashes 50 MB.
        cost.observe(1_000_000_000, 2_000_000_000);
        assert_eq!(cost.budget_rate(5.0), Some(50_000_000));
        // Twice the budget, twice the rate.
        assert_eq!(cost.budget_rate(10.0), Some(100_000_000));
        // Bytes getting dearer (a slower disk path, a busy CPU) slow it down.
        cost.observe(4_000_000_000, 2_000_000_000);
        let slower = cost.budget_rate(5.0).unwrap();
        assert!(slower < 50_000_000, "{slower}");
        // Never below the floor, even with no budget.
        assert_eq!(cost.budget_rate(0.0), Some(MIN_BUDGET_HASH_RATE));
    }

    #[test]
    fn thread_cpu_time_counts_this_threads_work_only() {
        let before = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let busy = thread_cpu_ns() - before;
        assert!(busy > 0, "the loop used no CPU time");
        let before = thread_cpu_ns();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let slept = thread_cpu_ns() - before;
        assert!(slept < 100_000_000, "sleeping counted {slept} ns");
    }

    #[test]
    fn weight_names_are_sniffed_before_libraries_and_build_artefacts() {
        let mut paths = [
            "/usr/lib/x86_64-linux-gnu/libLLVM.so.19.1",
            "/work/target/debug/deps/libtokio-1a2b.rlib",
            "/srv/data/blob",
            "/models/llama/model-00001-of-00002.safetensors",
            "/root/.ollama/models/blobs/sha256-0123abcd",
            "/usr/lib/libfoo.so",
            "/tmp/ckpt/pytorch_model.BIN",
        ];
        paths.sort_by_key(|p| sniff_rank(Path::new(p)));
        assert_eq!(
            &paths[..3],
            [
                "/models/llama/model-00001-of-00002.safetensors",
                "/root/.ollama/models/blobs/sha256-0123abcd",
                "/tmp/ckpt/pytorch_model.BIN",
            ]
        );
        assert_eq!(paths[3], "/srv/data/blob", "unknown names between");
        assert_eq!(sniff_rank(Path::new("/usr/lib/libfoo.so")), 2);
        assert_eq!(sniff_rank(Path::new("/a/libLLVM.so.19.1")), 2);
    }
}
