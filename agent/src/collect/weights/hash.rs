//! Fingerprints of weight files: the SHA-256 of the whole file (the value a model hub publishes
//! for LFS files), streamed through a fixed buffer under an IO rate limit, and cached on disk by
//! `(device, inode, size, mtime)` so that an unchanged file is never hashed twice, even across
//! restarts.
//!
//! - [`sha256_file`] (and [`sha256_file_with_key`]): streaming, [`HASH_BUF_BYTES`] at a time
//!   through `ring` (which uses the CPU's SHA instructions), cancellable, with progress, and
//!   refusing a file that changed while it was read;
//! - [`RateLimiter`]: a token bucket (1-second burst) whose rate can be changed at any time,
//!   also from another thread through a [`RateHandle`] (the budget slows hashing down);
//! - [`HashCache`]: the persistent cache (`<state_dir>/`[`DEFAULT_CACHE_FILE`]), atomic saves,
//!   bounded by age and count.
//!
//! Memory: one [`HASH_BUF_BYTES`] buffer per hash in flight, whatever the file size (the bench
//! `tests/examples/bench_hash.rs` prints the peak RSS next to the file size). A cache entry costs
//! about 100 bytes in memory, so the [`MAX_CACHE_ENTRIES`] bound is about 100 MB: far more files
//! than a node holds.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ring::digest::{Context, SHA256};
use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use sov_common::clock::now_unix_ms;

/// The fixed streaming buffer: the only memory a hash uses that grows with nothing.
pub const HASH_BUF_BYTES: usize = 1 << 20;
/// File name of the cache inside the agent's state directory.
pub const DEFAULT_CACHE_FILE: &str = "hash-cache.json";
/// Entries not seen for this long are evicted on save.
pub const DEFAULT_CACHE_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// At most this many entries are kept (the least recently seen go first).
pub const MAX_CACHE_ENTRIES: usize = 200_000;
/// Version of the cache file format.
const CACHE_VERSION: u32 = 1;
/// The burst a [`RateLimiter`] allows after being idle: one second of its rate.
const BURST: Duration = Duration::from_secs(1);
/// A throttled hash sleeps at most this long at a time, so that cancellation and rate changes
/// take effect promptly even at a very low rate.
const THROTTLE_SLICE: Duration = Duration::from_millis(100);

/// Why a file has no fingerprint.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// Opening, reading or `stat`ing the file failed.
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The cancellation flag was raised.
    #[error("hashing cancelled")]
    Cancelled,
    /// Size or modification time changed between the start and the end of the read.
    #[error("{path} changed while it was hashed")]
    ChangedWhileHashing { path: PathBuf },
}

/// What identifies one version of one file on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileKey {
    /// `st_dev`, as `MetadataExt::dev()`.
    pub device: u64,
    /// `st_ino`.
    pub inode: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the unix epoch.
    pub mtime_unix_ns: i64,
}

/// The key of the file `meta` describes.
pub fn file_key(meta: &fs::Metadata) -> FileKey {
    FileKey {
        device: meta.dev(),
        inode: meta.ino(),
        size: meta.len(),
        mtime_unix_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
    }
}

/// Monotonic time and sleeping, injectable so that tests check the limiter's arithmetic
/// without waiting.
pub trait Clock: Send + fmt::Debug {
    /// Time since an arbitrary fixed origin; never goes backwards.
    fn now(&self) -> Duration;
    /// Sleeps for `d`.
    fn sleep(&mut self, d: Duration);
}

/// The real clock: [`Instant`] and [`std::thread::sleep`].
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// Changes the rate of a [`RateLimiter`] from anywhere (another thread, the budget); the
/// limiter applies it within [`THROTTLE_SLICE`], even in the middle of a file.
#[derive(Debug, Clone)]
pub struct RateHandle {
    /// Bytes per second; 0 means unlimited.
    bytes_per_sec: Arc<AtomicU64>,
}

impl RateHandle {
    /// `None` = unlimited; `Some(0)` is taken as 1 byte per second.
    pub fn set(&self, bytes_per_sec: Option<u64>) {
        let raw = bytes_per_sec.map_or(0, |r| r.max(1));
        self.bytes_per_sec.store(raw, Ordering::Relaxed);
    }

    /// The current rate; `None` = unlimited.
    pub fn get(&self) -> Option<u64> {
        Some(self.bytes_per_sec.load(Ordering::Relaxed)).filter(|r| *r != 0)
    }
}

/// Token bucket: `None` = unlimited; else bytes per second with a 1-second burst. It starts
/// empty, so even the first second stays within the rate.
///
/// Kept as a virtual finish time (GCRA): `tat` is when the bucket would be full again; a call
/// may proceed while `tat - now <= 1 s`.
#[derive(Debug)]
pub struct RateLimiter {
    handle: RateHandle,
    /// The rate the bucket state was computed with.
    applied: Option<u64>,
    /// Theoretical arrival time, nanoseconds on `clock`.
    tat_ns: u128,
    clock: Box<dyn Clock>,
}

impl RateLimiter {
    /// A limiter on the real clock.
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        Self::new_with_clock(bytes_per_sec, Box::new(SystemClock::default()))
    }

    /// A limiter on the given clock (tests).
    pub fn new_with_clock(bytes_per_sec: Option<u64>, clock: Box<dyn Clock>) -> Self {
        let handle = RateHandle {
            bytes_per_sec: Arc::new(AtomicU64::new(0)),
        };
        handle.set(bytes_per_sec);
        let now = clock.now().as_nanos();
        Self {
            applied: handle.get(),
            handle,
            tat_ns: now + BURST.as_nanos(),
            clock,
        }
    }

    /// Changes the rate; `None` = unlimited. Tokens saved up so far are kept (up to the new
    /// burst), and so is any debt.
    pub fn set_rate(&mut self, bytes_per_sec: Option<u64>) {
        self.handle.set(bytes_per_sec);
        self.sync_rate();
    }

    /// A handle that changes this limiter's rate from elsewhere.
    pub fn handle(&self) -> RateHandle {
        self.handle.clone()
    }

    /// Accounts for `n` bytes, sleeping as needed to stay within the rate.
    pub fn throttle(&mut self, n: u64) {
        self.throttle_or_cancel(n, &AtomicBool::new(false));
    }

    /// [`Self::throttle`] that stops sleeping when `cancel` is raised; false when it was.
    pub fn throttle_or_cancel(&mut self, n: u64, cancel: &AtomicBool) -> bool {
        self.sync_rate();
        let Some(rate) = self.applied else {
            return true;
        };
        let now = self.clock.now().as_nanos();
        self.tat_ns = self.tat_ns.max(now) + cost_ns(n, rate);
        loop {
            let now = self.clock.now().as_nanos();
            let wait = self.tat_ns.saturating_sub(now + BURST.as_nanos());
            if wait == 0 {
                return true;
            }
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            let slice = wait.min(THROTTLE_SLICE.as_nanos());
            self.clock.sleep(Duration::from_nanos(
                u64::try_from(slice).unwrap_or(u64::MAX),
            ));
            self.sync_rate();
            if self.applied.is_none() {
                return true;
            }
        }
    }

    /// Applies a rate changed through the handle, converting the bucket's level: the saved-up
    /// bytes (or the debt) stay the same number of bytes at the new rate.
    fn sync_rate(&mut self) {
        let new = self.handle.get();
        if new == self.applied {
            return;
        }
        let now = self.clock.now().as_nanos();
        let burst = BURST.as_nanos();
        self.tat_ns = match (self.applied, new) {
            (Some(old), Some(new)) => {
                let level = self.tat_ns.saturating_sub(now);
                let new_level = if level <= burst {
                    // Saved-up bytes, at most one burst of the new rate.
                    burst.saturating_sub((burst - level) * u128::from(old) / u128::from(new))
                } else {
                    burst + (level - burst) * u128::from(old) / u128::from(new)
                };
                now + new_level
            }
            // From unlimited: start empty, like a new limiter.
            (None, Some(_)) => now + burst,
            (_, None) => self.tat_ns,
        };
        self.applied = new;
    }
}

/// Nanoseconds that `n` bytes cost at `rate` bytes per second, rounded up.
fn cost_ns(n: u64, rate: u64) -> u128 {
    (u128::from(n) * 1_000_000_000).div_ceil(u128::from(rate))
}

/// Streaming SHA-256 of the file at `path`, lower-case hex. See [`sha256_file_with_key`].
pub fn sha256_file(
    path: &Path,
    limiter: &mut RateLimiter,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(u64),
) -> Result<String, HashError> {
    sha256_file_with_key(path, limiter, cancel, progress).map(|(_, sha)| sha)
}

/// Streaming SHA-256 of the file at `path` together with the [`FileKey`] of the file actually
/// read (the path may be replaced meanwhile; the key is taken from the open descriptor, so it
/// is the right key to cache the hash under).
///
/// Reads [`HASH_BUF_BYTES`] at a time; per chunk it checks `cancel`, calls `limiter` and then
/// `progress(bytes_done)`. Fails with [`HashError::ChangedWhileHashing`] when the file's size or
/// modification time changed during the read, or fewer or more bytes than its size were read.
pub fn sha256_file_with_key(
    path: &Path,
    limiter: &mut RateLimiter,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(u64),
) -> Result<(FileKey, String), HashError> {
    let io_err = |source| HashError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let key = file_key(&file.metadata().map_err(io_err)?);
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; HASH_BUF_BYTES];
    let mut done = 0u64;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(HashError::Cancelled);
        }
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        ctx.update(&buf[..n]);
        done += n as u64;
        if !limiter.throttle_or_cancel(n as u64, cancel) {
            return Err(HashError::Cancelled);
        }
        progress(done);
    }
    let after = file_key(&file.metadata().map_err(io_err)?);
    if after != key || done != key.size {
        return Err(HashError::ChangedWhileHashing {
            path: path.to_path_buf(),
        });
    }
    Ok((key, hex(ctx.finish().as_ref())))
}

/// A fingerprint in progress: the digest state after the first `done` bytes of the file whose
/// key was `key` when hashing began. Kept in memory between slices (about 200 bytes).
#[derive(Clone)]
pub struct PartialHash {
    /// The file being hashed, as it was at the start.
    pub key: FileKey,
    /// Bytes hashed so far.
    pub done: u64,
    ctx: Context,
}

impl fmt::Debug for PartialHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartialHash")
            .field("key", &self.key)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// What one slice of hashing ended with.
#[derive(Debug)]
pub enum Slice {
    /// The whole file is hashed: the key of the file read and its lower-case hex SHA-256.
    Done(FileKey, String),
    /// More to read; continue with this state.
    Partial(Box<PartialHash>),
}

/// Hashes at most `max_bytes` more of the file at `path`, continuing `partial` when given and
/// the file is still the one it began on (same [`FileKey`]); a changed file starts again from
/// its first byte. Same throttling, cancellation and progress as [`sha256_file_with_key`]
/// (`progress` gets the bytes done in the whole file). So a huge file never holds the hasher
/// for longer than one slice: the caller hashes other files in between.
pub fn sha256_slice(
    path: &Path,
    partial: Option<Box<PartialHash>>,
    max_bytes: u64,
    limiter: &mut RateLimiter,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(u64),
) -> Result<Slice, HashError> {
    let io_err = |source| HashError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let key = file_key(&file.metadata().map_err(io_err)?);
    let mut state = match partial.filter(|p| p.key == key) {
        Some(p) => *p,
        None => PartialHash {
            key,
            done: 0,
            ctx: Context::new(&SHA256),
        },
    };
    if state.done > 0 {
        io::Seek::seek(&mut file, io::SeekFrom::Start(state.done)).map_err(io_err)?;
    }
    let mut buf = vec![0u8; HASH_BUF_BYTES];
    let mut this_slice = 0u64;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(HashError::Cancelled);
        }
        if this_slice >= max_bytes {
            return Ok(Slice::Partial(Box::new(state)));
        }
        let want = usize::try_from((max_bytes - this_slice).min(HASH_BUF_BYTES as u64))
            .unwrap_or(HASH_BUF_BYTES);
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        state.ctx.update(&buf[..n]);
        state.done += n as u64;
        this_slice += n as u64;
        if !limiter.throttle_or_cancel(n as u64, cancel) {
            return Err(HashError::Cancelled);
        }
        progress(state.done);
    }
    let after = file_key(&file.metadata().map_err(io_err)?);
    if after != state.key || state.done != state.key.size {
        return Err(HashError::ChangedWhileHashing {
            path: path.to_path_buf(),
        });
    }
    Ok(Slice::Done(state.key, hex(state.ctx.finish().as_ref())))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nibble(b[2 * i])? << 4) | nibble(b[2 * i + 1])?;
    }
    Some(out)
}

/// One cached fingerprint in memory.
#[derive(Debug, Clone, Copy)]
struct Entry {
    sha256: [u8; 32],
    last_seen_unix_ms: i64,
}

/// One cached fingerprint on disk.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    device: u64,
    inode: u64,
    size: u64,
    mtime_unix_ns: i64,
    sha256: String,
    last_seen_unix_ms: i64,
}

/// The cache file: `{"version":1,"entries":[{…Record…}, …]}`, read straight into the map.
#[derive(Deserialize)]
struct CacheFileIn {
    version: u32,
    #[serde(deserialize_with = "entries_into_map")]
    entries: HashMap<FileKey, Entry>,
}

fn entries_into_map<'de, D: Deserializer<'de>>(d: D) -> Result<HashMap<FileKey, Entry>, D::Error> {
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = HashMap<FileKey, Entry>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of cache entries")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut map = HashMap::with_capacity(seq.size_hint().unwrap_or(0).min(65_536));
            while let Some(r) = seq.next_element::<Record>()? {
                let sha256 = unhex(&r.sha256)
                    .ok_or_else(|| serde::de::Error::custom("sha256 is not 64 hex digits"))?;
                let key = FileKey {
                    device: r.device,
                    inode: r.inode,
                    size: r.size,
                    mtime_unix_ns: r.mtime_unix_ns,
                };
                map.insert(
                    key,
                    Entry {
                        sha256,
                        last_seen_unix_ms: r.last_seen_unix_ms,
                    },
                );
            }
            Ok(map)
        }
    }
    d.deserialize_seq(Entries)
}

/// Persistent cache of fingerprints: [`FileKey`] → SHA-256, with when each was last seen.
/// A cache, not a source of truth: a missing or corrupt file starts it empty.
#[derive(Debug)]
pub struct HashCache {
    path: PathBuf,
    entries: HashMap<FileKey, Entry>,
    dirty: bool,
    max_entries: usize,
    max_age: Duration,
}

impl HashCache {
    /// Loads the cache at `path` (normally `<state_dir>/hash-cache.json`). A missing file gives
    /// an empty cache; an unreadable one too (logged); a corrupt one is renamed to
    /// `<path>.corrupt` (logged) and the cache starts empty.
    pub fn load(path: &Path) -> Self {
        let mut cache = Self {
            path: path.to_path_buf(),
            entries: HashMap::new(),
            dirty: false,
            max_entries: MAX_CACHE_ENTRIES,
            max_age: DEFAULT_CACHE_MAX_AGE,
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return cache,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot read the hash cache; starting empty");
                return cache;
            }
        };
        let problem = match serde_json::from_reader::<_, CacheFileIn>(BufReader::new(file)) {
            Ok(f) if f.version == CACHE_VERSION => {
                cache.entries = f.entries;
                return cache;
            }
            Ok(f) => format!("unknown version {}", f.version),
            Err(e) => e.to_string(),
        };
        let mut aside = path.as_os_str().to_owned();
        aside.push(".corrupt");
        let renamed = fs::rename(path, &aside);
        tracing::warn!(
            path = %path.display(),
            error = %problem,
            moved_to = %PathBuf::from(&aside).display(),
            moved = renamed.is_ok(),
            "corrupt hash cache; starting empty"
        );
        // Nothing on disk now (or something unusable): the next save must write.
        cache.dirty = true;
        cache
    }

    /// Replaces the eviction bounds (defaults: [`MAX_CACHE_ENTRIES`], [`DEFAULT_CACHE_MAX_AGE`]).
    pub fn with_limits(mut self, max_entries: usize, max_age: Duration) -> Self {
        self.max_entries = max_entries;
        self.max_age = max_age;
        self
    }

    /// The fingerprint of `key`, marking it seen now.
    pub fn get(&mut self, key: &FileKey) -> Option<String> {
        self.get_at(key, now_unix_ms())
    }

    fn get_at(&mut self, key: &FileKey, now_ms: i64) -> Option<String> {
        let e = self.entries.get_mut(key)?;
        if e.last_seen_unix_ms < now_ms {
            e.last_seen_unix_ms = now_ms;
            self.dirty = true;
        }
        Some(hex(&e.sha256))
    }

    /// Records the fingerprint of `key`. A value that is not 64 hex digits is ignored (logged).
    pub fn insert(&mut self, key: FileKey, sha256: String) {
        self.insert_at(key, &sha256, now_unix_ms());
    }

    fn insert_at(&mut self, key: FileKey, sha256: &str, now_ms: i64) {
        let Some(sha256) = unhex(sha256) else {
            tracing::warn!(sha256, "not a sha256; not cached");
            return;
        };
        self.entries.insert(
            key,
            Entry {
                sha256,
                last_seen_unix_ms: now_ms,
            },
        );
        self.dirty = true;
    }

    /// Evicts entries older than the age bound and beyond the count bound (least recently seen
    /// first), then writes the file atomically (temporary file, fsync, rename, fsync of the
    /// directory). Does nothing when nothing changed since the last load or save.
    pub fn save(&mut self) -> io::Result<()> {
        self.save_at(now_unix_ms())
    }

    fn save_at(&mut self, now_ms: i64) -> io::Result<()> {
        self.evict(now_ms);
        if !self.dirty {
            return Ok(());
        }
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir)?;
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp)?;
        let mut w = BufWriter::new(file);
        write!(w, "{{\"version\":{CACHE_VERSION},\"entries\":[")?;
        for (i, (k, e)) in self.entries.iter().enumerate() {
            if i > 0 {
                w.write_all(b",\n")?;
            }
            let record = Record {
                device: k.device,
                inode: k.inode,
                size: k.size,
                mtime_unix_ns: k.mtime_unix_ns,
                sha256: hex(&e.sha256),
                last_seen_unix_ms: e.last_seen_unix_ms,
            };
            serde_json::to_writer(&mut w, &record)?;
        }
        w.write_all(b"]}\n")?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &self.path)?;
        File::open(&dir)?.sync_all()?;
        self.dirty = false;
        Ok(())
    }

    fn evict(&mut self, now_ms: i64) {
        let before = self.entries.len();
        let max_age_ms = i64::try_from(self.max_age.as_millis()).unwrap_or(i64::MAX);
        let oldest_kept = now_ms.saturating_sub(max_age_ms);
        self.entries
            .retain(|_, e| e.last_seen_unix_ms >= oldest_kept);
        if self.entries.len() > self.max_entries {
            let mut seen: Vec<i64> = self.entries.values().map(|e| e.last_seen_unix_ms).collect();
            let excess = self.entries.len() - self.max_entries;
            let (_, cut, _) = seen.select_nth_unstable(excess - 1);
            let cut = *cut;
            // Drop everything strictly older than the cut, then enough entries at the cut.
            let mut at_cut = excess
                - self
                    .entries
                    .values()
                    .filter(|e| e.last_seen_unix_ms < cut)
                    .count();
            self.entries.retain(|_, e| {
                if e.last_seen_unix_ms < cut {
                    false
                } else if e.last_seen_unix_ms == cut && at_cut > 0 {
                    at_cut -= 1;
                    false
                } else {
                    true
                }
            });
        }
        let evicted = before - self.entries.len();
        if evicted > 0 {
            tracing::debug!(
                evicted,
                kept = self.entries.len(),
                "hash cache entries evicted"
            );
            self.dirty = true;
        }
    }

    /// Number of cached fingerprints.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::Mutex;

    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    type SleepHook = Box<dyn FnMut(u64) + Send>;

    /// A clock that only moves when slept on (or when a test moves it), and can run a hook on
    /// each sleep.
    #[derive(Clone, Default)]
    struct FakeClock {
        now_ns: Arc<AtomicU64>,
        sleeps: Arc<AtomicU64>,
        on_sleep: Arc<Mutex<Option<SleepHook>>>,
    }

    impl fmt::Debug for FakeClock {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("FakeClock")
                .field("now_ns", &self.now_ns)
                .finish()
        }
    }

    impl FakeClock {
        fn secs(&self) -> f64 {
            self.now_ns.load(Ordering::SeqCst) as f64 / 1e9
        }
        fn advance(&self, d: Duration) {
            self.now_ns.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.now_ns.load(Ordering::SeqCst))
        }
        fn sleep(&mut self, d: Duration) {
            assert!(d <= THROTTLE_SLICE, "one sleep of {d:?}");
            self.advance(d);
            let n = self.sleeps.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(hook) = self.on_sleep.lock().expect("lock").as_mut() {
                hook(n);
            }
        }
    }

    fn limiter(rate: Option<u64>) -> (RateLimiter, FakeClock) {
        let clock = FakeClock::default();
        clock.advance(Duration::from_secs(100));
        (
            RateLimiter::new_with_clock(rate, Box::new(clock.clone())),
            clock,
        )
    }

    fn unlimited() -> RateLimiter {
        RateLimiter::new(None)
    }

    fn hash(path: &Path) -> Result<String, HashError> {
        sha256_file(path, &mut unlimited(), &AtomicBool::new(false), &mut |_| {})
    }

    /// Deterministic pseudo-random bytes (xorshift64*).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// SHA-256 by another implementation: coreutils, else Python's hashlib.
    fn independent_sha256(path: &Path) -> String {
        let out = Command::new("sha256sum").arg(path).output();
        let out = match out {
            Ok(o) if o.status.success() => o.stdout,
            _ => Command::new("python3")
                .arg("-c")
                .arg("import hashlib,sys;print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())")
                .arg(path)
                .output()
                .expect("neither sha256sum nor python3 can hash")
                .stdout,
        };
        String::from_utf8_lossy(&out)
            .split_whitespace()
            .next()
            .expect("a digest")
            .to_string()
    }

    #[test]
    fn the_known_vector_abc_hashes_to_the_published_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").expect("write");
        assert_eq!(hash(&path).expect("hash"), ABC_SHA256);
    }

    #[test]
    fn generated_files_hash_like_an_independent_sha256() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sizes = [0, 1, HASH_BUF_BYTES, 3 << 20, (3 << 20) + 7];
        for len in sizes {
            let name = format!("len-{len}");
            let path = dir.path().join(&name);
            fs::write(&path, noise(len, len as u64)).expect("write");
            assert_eq!(
                hash(&path).expect("hash"),
                independent_sha256(&path),
                "{name}"
            );
        }
    }

    #[test]
    fn progress_counts_every_byte_chunk_by_chunk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let len = 2 * HASH_BUF_BYTES + 5;
        fs::write(&path, noise(len, 1)).expect("write");
        let mut seen = Vec::new();
        let (key, _) = sha256_file_with_key(
            &path,
            &mut unlimited(),
            &AtomicBool::new(false),
            &mut |done| seen.push(done),
        )
        .expect("hash");
        let h = HASH_BUF_BYTES as u64;
        assert_eq!(seen, vec![h, 2 * h, 2 * h + 5]);
        assert_eq!(key, file_key(&fs::metadata(&path).expect("stat")));
        assert_eq!(key.size, len as u64);
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let err = hash(Path::new("/nonexistent/model.bin")).expect_err("missing");
        assert!(matches!(err, HashError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/model.bin"));
    }

    #[test]
    fn cancelling_before_or_during_a_hash_stops_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, noise(3 << 20, 2)).expect("write");
        let cancel = AtomicBool::new(true);
        let r = sha256_file(&path, &mut unlimited(), &cancel, &mut |_| {});
        assert!(matches!(r, Err(HashError::Cancelled)), "{r:?}");

        let cancel = AtomicBool::new(false);
        let mut chunks = 0;
        let r = sha256_file(&path, &mut unlimited(), &cancel, &mut |_| {
            chunks += 1;
            cancel.store(true, Ordering::Relaxed);
        });
        assert!(matches!(r, Err(HashError::Cancelled)), "{r:?}");
        assert_eq!(chunks, 1);
    }

    #[test]
    fn cancelling_interrupts_a_long_throttle_sleep() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, b"0123456789").expect("write");
        // 1 byte per second: 10 bytes owe 10 s; cancelled at the third 100 ms slice.
        let (mut lim, clock) = limiter(Some(1));
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        *clock.on_sleep.lock().expect("lock") = Some(Box::new(move |n| {
            if n == 3 {
                c.store(true, Ordering::Relaxed);
            }
        }));
        let start = clock.secs();
        let r = sha256_file(&path, &mut lim, &cancel, &mut |_| {});
        assert!(matches!(r, Err(HashError::Cancelled)), "{r:?}");
        assert!(
            (clock.secs() - start - 0.3).abs() < 1e-6,
            "{}",
            clock.secs() - start
        );
    }

    #[test]
    fn hashing_in_slices_gives_the_same_digest_as_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, noise(5 * HASH_BUF_BYTES + 123, 9)).unwrap();
        let cancel = AtomicBool::new(false);
        let mut partial = None;
        let mut slices = 0;
        let sha = loop {
            slices += 1;
            let mut last = 0;
            match sha256_slice(
                &path,
                partial.take(),
                2 * HASH_BUF_BYTES as u64,
                &mut unlimited(),
                &cancel,
                &mut |d| last = d,
            )
            .unwrap()
            {
                Slice::Done(key, sha) => {
                    assert_eq!(key.size, 5 * HASH_BUF_BYTES as u64 + 123);
                    break sha;
                }
                Slice::Partial(p) => {
                    assert_eq!(p.done, last);
                    assert_eq!(p.done, slices * 2 * HASH_BUF_BYTES as u64);
                    partial = Some(p);
                }
            }
        };
        assert_eq!(slices, 3);
        assert_eq!(sha, independent_sha256(&path));
    }

    #[test]
    fn a_file_replaced_between_slices_is_hashed_again_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, noise(3 * HASH_BUF_BYTES, 1)).unwrap();
        let cancel = AtomicBool::new(false);
        let Slice::Partial(p) = sha256_slice(
            &path,
            None,
            HASH_BUF_BYTES as u64,
            &mut unlimited(),
            &cancel,
            &mut |_| {},
        )
        .unwrap() else {
            panic!("one slice of three");
        };
        let tmp = dir.path().join("g");
        fs::write(&tmp, noise(2 * HASH_BUF_BYTES, 2)).unwrap();
        fs::rename(&tmp, &path).unwrap();
        let out = sha256_slice(
            &path,
            Some(p),
            u64::MAX,
            &mut unlimited(),
            &cancel,
            &mut |_| {},
        )
        .unwrap();
        let Slice::Done(_, sha) = out else {
            panic!("done in one slice");
        };
        assert_eq!(
            sha,
            independent_sha256(&path),
            "the new file's digest, not a mix"
        );
    }

    #[test]
    fn a_file_that_grows_while_hashed_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("growing");
        fs::write(&path, noise(3 << 20, 3)).expect("write");
        // Another thread appends after the first chunk; the hash waits for it (deterministic),
        // under a rate limit so the read really is in progress.
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(0);
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<()>(0);
        let p = path.clone();
        let writer = std::thread::spawn(move || {
            if rx.recv().is_ok() {
                let mut f = fs::OpenOptions::new().append(true).open(&p).expect("open");
                f.write_all(b"more weights").expect("append");
                let _ = done_tx.send(());
            }
        });
        let mut lim = RateLimiter::new(Some(64 << 20));
        let mut first = true;
        let r = sha256_file(&path, &mut lim, &AtomicBool::new(false), &mut |_| {
            if std::mem::take(&mut first) {
                tx.send(()).expect("signal");
                done_rx.recv().expect("appended");
            }
        });
        writer.join().expect("writer");
        assert!(
            matches!(r, Err(HashError::ChangedWhileHashing { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn a_real_limit_of_2_mib_per_second_takes_over_a_second_for_3_mib() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, noise(3 << 20, 4)).expect("write");
        let started = Instant::now();
        let mut lim = RateLimiter::new(Some(2 << 20));
        sha256_file(&path, &mut lim, &AtomicBool::new(false), &mut |_| {}).expect("hash");
        // The bucket starts empty: 3 MiB at 2 MiB/s is 1.5 s; only a lower bound is asserted.
        assert!(
            started.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_bucket_starts_empty_and_refills_one_second_of_burst() {
        let (mut lim, clock) = limiter(Some(1000));
        let t0 = clock.secs();
        lim.throttle(500);
        assert!((clock.secs() - t0 - 0.5).abs() < 1e-6);
        lim.throttle(1000);
        assert!((clock.secs() - t0 - 1.5).abs() < 1e-6);

        // Idle for 10 s: only one second of burst is saved up.
        clock.advance(Duration::from_secs(10));
        let t1 = clock.secs();
        lim.throttle(1000);
        assert_eq!(clock.secs(), t1, "the burst passes without sleeping");
        lim.throttle(1000);
        assert!((clock.secs() - t1 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_chunk_larger_than_the_burst_sleeps_in_short_slices() {
        let (mut lim, clock) = limiter(Some(100));
        let t0 = clock.secs();
        lim.throttle(1000);
        assert!(
            (clock.secs() - t0 - 10.0).abs() < 1e-6,
            "{}",
            clock.secs() - t0
        );
        assert_eq!(clock.sleeps.load(Ordering::SeqCst), 100);
    }

    #[test]
    fn unlimited_never_sleeps_and_set_rate_switches_both_ways() {
        let (mut lim, clock) = limiter(None);
        let t0 = clock.secs();
        lim.throttle(u64::MAX / 2);
        assert_eq!(clock.secs(), t0);

        lim.set_rate(Some(2000));
        lim.throttle(1000);
        assert!(
            (clock.secs() - t0 - 0.5).abs() < 1e-6,
            "starts empty after unlimited"
        );

        lim.set_rate(None);
        lim.throttle(1 << 40);
        assert!((clock.secs() - t0 - 0.5).abs() < 1e-6);
    }

    #[test]
    fn slowing_down_keeps_the_saved_bytes_not_the_saved_time() {
        let (mut lim, clock) = limiter(Some(1000));
        clock.advance(Duration::from_secs(5)); // full: 1000 bytes saved
        lim.set_rate(Some(100)); // burst of the new rate is 100 bytes
        let t0 = clock.secs();
        lim.throttle(100);
        assert_eq!(clock.secs(), t0);
        lim.throttle(100);
        assert!(
            (clock.secs() - t0 - 1.0).abs() < 1e-6,
            "{}",
            clock.secs() - t0
        );
    }

    #[test]
    fn a_rate_change_through_the_handle_applies_mid_sleep() {
        let (mut lim, clock) = limiter(Some(100));
        let handle = lim.handle();
        *clock.on_sleep.lock().expect("lock") = Some(Box::new(move |n| {
            if n == 5 {
                handle.set(None);
            }
        }));
        let t0 = clock.secs();
        lim.throttle(1000); // would be 10 s
        assert!(
            (clock.secs() - t0 - 0.5).abs() < 1e-6,
            "{}",
            clock.secs() - t0
        );
        assert_eq!(lim.handle().get(), None);
    }

    fn key(i: u64) -> FileKey {
        FileKey {
            device: 2049,
            inode: 1000 + i,
            size: i * 10,
            mtime_unix_ns: 1_700_000_000_000_000_000 + i as i64,
        }
    }

    fn sha(i: u8) -> String {
        hex(&[i; 32])
    }

    #[test]
    fn the_cache_round_trips_through_save_and_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state").join(DEFAULT_CACHE_FILE);
        let mut cache = HashCache::load(&path);
        assert!(cache.is_empty());
        cache.insert(key(1), ABC_SHA256.to_string());
        cache.insert(key(2), sha(2));
        cache.insert(key(3), "not a sha".to_string());
        assert_eq!(cache.len(), 2);
        cache.save().expect("save");
        assert!(
            !dir.path()
                .join("state")
                .join("hash-cache.json.tmp")
                .exists()
        );

        let mut again = HashCache::load(&path);
        assert_eq!(again.len(), 2);
        assert_eq!(again.get(&key(1)).as_deref(), Some(ABC_SHA256));
        assert_eq!(again.get(&key(2)), Some(sha(2)));
        assert_eq!(again.get(&key(3)), None);
        // Same file, new mtime: another version, not cached.
        let touched = FileKey {
            mtime_unix_ns: key(1).mtime_unix_ns + 1,
            ..key(1)
        };
        assert_eq!(again.get(&touched), None);
    }

    #[test]
    fn saving_an_unchanged_cache_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DEFAULT_CACHE_FILE);
        let mut cache = HashCache::load(&path);
        cache.save().expect("save");
        assert!(!path.exists());
    }

    #[test]
    fn a_corrupt_cache_is_set_aside_and_starts_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DEFAULT_CACHE_FILE);
        for garbage in [
            &b"{\"version\":1,\"entries\":[{\"dev"[..],
            b"\x00\xff binary",
            b"{\"version\":99,\"entries\":[]}",
            b"{\"version\":1,\"entries\":[{\"device\":1,\"inode\":2,\"size\":3,\"mtime_unix_ns\":4,\"sha256\":\"zz\",\"last_seen_unix_ms\":5}]}",
        ] {
            fs::write(&path, garbage).expect("write");
            let mut cache = HashCache::load(&path);
            assert!(cache.is_empty());
            let aside = dir.path().join("hash-cache.json.corrupt");
            assert_eq!(fs::read(&aside).expect("set aside"), garbage);
            assert!(!path.exists());
            cache.insert(key(1), sha(1));
            cache.save().expect("save");
            assert_eq!(HashCache::load(&path).len(), 1);
        }
    }

    #[test]
    fn entries_unseen_for_30_days_are_evicted_on_save() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DEFAULT_CACHE_FILE);
        let day_ms = 24 * 3600 * 1000;
        let now = 1_800_000_000_000;
        let mut cache = HashCache::load(&path);
        cache.insert_at(key(1), &sha(1), now - 31 * day_ms);
        cache.insert_at(key(2), &sha(2), now - 29 * day_ms);
        cache.insert_at(key(3), &sha(3), now - 40 * day_ms);
        // Seen again today: kept.
        assert!(cache.get_at(&key(3), now).is_some());
        cache.save_at(now).expect("save");
        let mut again = HashCache::load(&path);
        assert_eq!(again.len(), 2);
        assert!(again.get(&key(1)).is_none());
        assert!(again.get(&key(2)).is_some());
        assert!(again.get(&key(3)).is_some());
    }

    #[test]
    fn beyond_the_entry_bound_the_least_recently_seen_go_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DEFAULT_CACHE_FILE);
        let now = 1_800_000_000_000;
        let mut cache = HashCache::load(&path).with_limits(3, DEFAULT_CACHE_MAX_AGE);
        // 0 and 1 share the oldest time; 2..5 are newer.
        for i in 0..6u8 {
            let seen = now - 1000 + i64::from(i.max(1));
            cache.insert_at(key(u64::from(i)), &sha(i), seen);
        }
        cache.save_at(now).expect("save");
        assert_eq!(cache.len(), 3);
        let mut again = HashCache::load(&path);
        let kept: Vec<u64> = (0..6).filter(|i| again.get(&key(*i)).is_some()).collect();
        assert_eq!(kept, vec![3, 4, 5]);
    }

    #[test]
    fn file_key_reads_device_inode_size_and_nanosecond_mtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        fs::write(&path, b"12345").expect("write");
        let meta = fs::metadata(&path).expect("stat");
        let k = file_key(&meta);
        assert_eq!((k.device, k.inode, k.size), (meta.dev(), meta.ino(), 5));
        let mtime = meta
            .modified()
            .expect("mtime")
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970");
        assert_eq!(k.mtime_unix_ns, mtime.as_nanos() as i64);
        let json = serde_json::to_string(&k).expect("json");
        assert_eq!(serde_json::from_str::<FileKey>(&json).expect("parse"), k);
    }
}
