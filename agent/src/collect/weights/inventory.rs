//! The node's weight file inventory: discovery → content sniffing → identity → physical
//! location → users → fingerprint, kept current by a background scanner thread, and handed to
//! the report builder as a full inventory or as the changes since the previous report.
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
use super::schedule::{self, Hint};
use super::storage::{self, MountTable};
use super::users;
use crate::config::WeightsConfig;

/// Most header errors remembered for `scan` to show.
pub const MAX_ERRORS: usize = 100;
/// Hashing rate while the agent is over its resource budget, bytes per second.
pub const REDUCED_HASH_RATE: u64 = 10 * 1024 * 1024;
/// File name of the fingerprint cache in the state directory.
pub const HASH_CACHE_FILE: &str = "hash-cache.json";

/// (device, inode, size, mtime ms): when unchanged, nothing about the file is read again.
type FileStamp = (u64, u64, u64, i64);

#[derive(Debug, Clone)]
struct Entry {
    stamp: FileStamp,
    file: pb::WeightFile,
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
}

/// A handle on the inventory, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct WeightsHandle {
    inner: Arc<Mutex<Inventory>>,
    reduced: Arc<AtomicBool>,
}

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
        let inv = lock(&self.inner);
        let mut pids: Vec<u32> = inv
            .entries
            .values()
            .flat_map(|e| e.file.users.iter().map(|u| u.pid))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
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
    /// Fingerprints in progress, by path (at most [`schedule::MAX_PARTIALS`]).
    partials: HashMap<String, Box<PartialHash>>,
    /// (device, inode) of this process's executable: processes running it are the agent.
    self_exe: Option<(u64, u64)>,
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
        Self {
            cache: HashCache::load(&state_dir.join(HASH_CACHE_FILE)),
            limiter,
            cfg,
            handle,
            proc_root: PathBuf::from("/proc"),
            partials: HashMap::new(),
            self_exe: std::fs::metadata("/proc/self/exe")
                .ok()
                .map(|m| (m.dev(), m.ino())),
        }
    }

    /// The roots to search: configured, or the defaults that exist on this machine.
    pub fn roots(&self) -> Vec<PathBuf> {
        match &self.cfg.roots {
            Some(r) => r.clone(),
            None => discover::default_roots(&|k| std::env::var(k).ok(), Path::new("/")),
        }
    }

    /// One pass: discover, sniff new or changed files, locate them; no users, no hashing.
    pub fn scan(&mut self) {
        let roots = self.roots();
        let walk = discover::walk(
            &roots,
            discover::DEFAULT_MAX_DEPTH,
            discover::DEFAULT_MAX_FILES,
        );
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
        for c in &walk.candidates {
            let path = c.path.to_string_lossy().into_owned();
            let stamp: FileStamp = (c.device, c.inode, c.size, c.mtime_unix_ms);
            seen.insert(path.clone());
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
                    fresh.push(Entry {
                        stamp,
                        file: describe(c, &parsed, id, mounts),
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
        // Fingerprints already known (this run or a previous one) are filled in at once.
        for e in &mut fresh {
            if let Ok(m) = std::fs::metadata(&e.file.path) {
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
            inv.not_weights.insert(k, stamp);
        }
        for (path, e) in errors {
            if inv.errors.len() < MAX_ERRORS {
                inv.errors.push((path, e));
            }
        }
        for e in fresh {
            let path = e.file.path.clone();
            inv.changed.insert(path.clone());
            inv.removed.remove(&path);
            inv.entries.insert(path, e);
        }
        if !walk.truncated {
            let gone: Vec<String> = inv
                .entries
                .keys()
                .filter(|p| !seen.contains(*p))
                .cloned()
                .collect();
            for p in gone {
                inv.entries.remove(&p);
                inv.changed.remove(&p);
                inv.removed.insert(p);
            }
            let live: HashSet<(u64, u64)> = walk
                .candidates
                .iter()
                .map(|c| (c.device, c.inode))
                .collect();
            inv.not_weights.retain(|k, _| live.contains(k));
        }
    }

    /// Which processes have each file open or mapped.
    pub fn refresh_users(&mut self) {
        let wanted: HashSet<(u64, u64)> = {
            let inv = lock(&self.handle.inner);
            inv.entries
                .values()
                .map(|e| (e.file.device, e.file.inode))
                .collect()
        };
        if wanted.is_empty() {
            return;
        }
        let uses = users::scan_users(&self.proc_root, &wanted);
        let mut names: HashMap<u32, String> = HashMap::new();
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
        for (path, e) in inv.entries.iter_mut() {
            let now: Vec<pb::WeightUser> = uses
                .get(&(e.file.device, e.file.inode))
                .map(|v| {
                    v.iter()
                        .filter(|u| !is_agent(u.pid))
                        .map(|u| pb::WeightUser {
                            pid: u.pid,
                            process: names
                                .entry(u.pid)
                                .or_insert_with(|| comm(&self.proc_root, u.pid))
                                .clone(),
                            mapped: u.mapped,
                            open: u.open,
                            gpu_uuids: vec![],
                        })
                        .collect()
                })
                .unwrap_or_default();
            if now != e.file.users {
                e.file.open_by_pids = now.iter().map(|u| u.pid).collect();
                e.file.users = now;
                changed.push(path.clone());
            }
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
        let queue: Vec<(String, u64)> = {
            let inv = lock(&self.handle.inner);
            let now = Instant::now();
            let mut q: Vec<(schedule::Priority, String, u64)> = inv
                .entries
                .values()
                .filter(|e| e.file.sha256.is_empty())
                .map(|e| {
                    let done = self.partials.get(&e.file.path).map_or(0, |p| p.done);
                    let p = schedule::priority(
                        &e.file,
                        done,
                        now.saturating_duration_since(e.found),
                        &inv.hints,
                    );
                    (p, e.file.path.clone(), e.file.size_bytes)
                })
                .collect();
            q.sort();
            q.into_iter().map(|(_, path, size)| (path, size)).collect()
        };
        let past = |d: Option<Instant>| d.is_some_and(|d| Instant::now() >= d);
        let mut hashed = 0usize;
        let mut left = false;
        for (key, size) in queue {
            if cancel.load(Ordering::Relaxed) || past(deadline) {
                left = true;
                break;
            }
            let path = PathBuf::from(&key);
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
                let slice = hash::sha256_slice(
                    &path,
                    partial,
                    schedule::slice_bytes(rate),
                    &mut self.limiter,
                    cancel,
                    &mut |done| progress(&key, done, size),
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
        if self.handle.reduced.load(Ordering::Relaxed) {
            Some(configured_rate(&self.cfg).map_or(REDUCED_HASH_RATE, |r| r.min(REDUCED_HASH_RATE)))
        } else {
            configured_rate(&self.cfg)
        }
    }

    /// Records a finished fingerprint on the entry, when the file hashed is the one the entry
    /// describes (a replaced file is described, and hashed from the cache, at the next scan).
    fn finish(&mut self, key: &str, fkey: hash::FileKey, sha: String) {
        self.partials.remove(key);
        let mut inv = lock(&self.handle.inner);
        if let Some(e) = inv.entries.get_mut(key).filter(|e| {
            (e.file.device, e.file.inode, e.file.size_bytes) == (fkey.device, fkey.inode, fkey.size)
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
    let storage = mounts
        .locate(&c.real_path, Some(c.device))
        .map(storage::location)
        .unwrap_or_default();
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
        ..Default::default()
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
