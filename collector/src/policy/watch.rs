//! [`PolicyWatch`]: the current policy, reloaded when its file changes.
//!
//! A change is any difference in the file's device, inode, size, modification or status-change
//! time, so both an in-place write and the usual write-a-temporary-then-rename are seen. A
//! valid new file replaces the policy; an invalid one is refused with every problem logged,
//! and the previous policy stays in force (it is not retried until the file changes again).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::{Policy, PolicyError};

/// What identifies one version of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of `path`, which must be a regular file: a FIFO, a device or a socket would
    /// block (or never end) the read, and a policy is none of them.
    fn of(path: &Path) -> std::io::Result<FileStamp> {
        let m = std::fs::metadata(path)?;
        if !m.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "not a regular file (a {}); a policy is a regular file",
                    kind_of(&m.file_type())
                ),
            ));
        }
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// What a file type is, in words.
fn kind_of(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() || t.is_char_device() {
        "device"
    } else if t.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// The policy loaded from one file, reloaded by [`PolicyWatch::reload_if_changed`].
#[derive(Debug)]
pub struct PolicyWatch {
    path: PathBuf,
    current: RwLock<Arc<Policy>>,
    /// The version last looked at (valid or not); `None` when it could not be stat'ed.
    seen: Mutex<Option<FileStamp>>,
    /// A reload thread is running ([`PolicyWatch::reload_off_thread`]).
    reloading: Arc<std::sync::atomic::AtomicBool>,
}

impl PolicyWatch {
    /// Load the file; a bad file is an error here (every problem listed), and so is a path
    /// that is not a regular file (a FIFO would block the start for ever).
    pub fn new(path: impl Into<PathBuf>) -> Result<Self, PolicyError> {
        let path = path.into();
        let seen = FileStamp::of(&path).map_err(|source| PolicyError::Read {
            path: path.clone(),
            source,
        })?;
        let policy = Policy::load(&path)?;
        log_warnings(&path, &policy);
        Ok(Self {
            path,
            current: RwLock::new(Arc::new(policy)),
            seen: Mutex::new(Some(seen)),
            reloading: Arc::default(),
        })
    }

    /// [`PolicyWatch::reload_if_changed`] on a thread of its own, waiting at most `timeout`
    /// for it: a read that blocks (a FIFO swapped in, a hung network filesystem) never stops
    /// the caller, nor the runtime's shutdown (the thread is not the runtime's). While a
    /// reload is still stuck, no second one starts; the policy in force stays. `None` when
    /// the reload did not finish in time (or one is still stuck), else whether a new policy
    /// is in force.
    pub async fn reload_off_thread(self: &Arc<Self>, timeout: std::time::Duration) -> Option<bool> {
        use std::sync::atomic::Ordering;
        if self.reloading.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                policy = %self.path.display(),
                "the previous read of the policy file has not returned (a FIFO or a hung filesystem?); keeping the policy in force"
            );
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("policy-reload".into())
            .spawn(move || {
                let changed = me.reload_if_changed();
                me.reloading.store(false, Ordering::Release);
                let _ = tx.send(changed);
            });
        if let Err(e) = spawned {
            self.reloading.store(false, Ordering::Release);
            tracing::warn!(error = %e, "cannot start the policy reload thread");
            return None;
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(changed)) => Some(changed),
            Ok(Err(_)) => None,
            Err(_) => {
                tracing::warn!(
                    policy = %self.path.display(),
                    timeout_secs = timeout.as_secs(),
                    "reading the policy file takes too long (a FIFO or a hung filesystem?); evaluating with the policy in force"
                );
                None
            }
        }
    }

    /// The file watched.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reload when the file changed since last looked at; true when a new policy is now in
    /// force. An unreadable or invalid file keeps the previous policy and logs why.
    pub fn reload_if_changed(&self) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let stamp = FileStamp::of(&self.path);
        let now = stamp.as_ref().ok().copied();
        if now.is_some() && now == *seen {
            return false;
        }
        if let Err(e) = stamp {
            if seen.is_some() {
                tracing::warn!(
                    policy = %self.path.display(),
                    error = %e,
                    "cannot read the policy file; keeping the previous policy"
                );
            }
            *seen = None;
            return false;
        }
        *seen = now;
        match Policy::load(&self.path) {
            Ok(policy) => {
                tracing::info!(
                    policy = %self.path.display(),
                    summary = %policy.summary(),
                    "policy reloaded"
                );
                log_warnings(&self.path, &policy);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(policy);
                true
            }
            Err(PolicyError::Invalid { problems, .. }) => {
                for problem in &problems.0 {
                    tracing::warn!(
                        policy = %self.path.display(),
                        problem = %problem,
                        "policy change refused; keeping the previous policy"
                    );
                }
                false
            }
            Err(e) => {
                tracing::warn!(
                    policy = %self.path.display(),
                    error = %e,
                    "policy change refused; keeping the previous policy"
                );
                false
            }
        }
    }
}

fn log_warnings(path: &Path, policy: &Policy) {
    for w in policy.warnings() {
        tracing::warn!(policy = %path.display(), warning = %w, "policy warning");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn a_replaced_file_is_picked_up_and_an_invalid_one_keeps_the_old_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "jurisdiction = \"MA\"\n").unwrap();
        let w = PolicyWatch::new(&path).unwrap();
        assert!(!w.reload_if_changed(), "unchanged");
        replace(&path, "jurisdiction = \"SN\"\n");
        assert!(w.reload_if_changed());
        assert_eq!(w.current().jurisdiction, "SN");
        replace(&path, "jurisdiction = \"Senegal\"\n");
        assert!(!w.reload_if_changed());
        assert_eq!(w.current().jurisdiction, "SN");
        assert!(!w.reload_if_changed(), "not retried until it changes");
        std::fs::remove_file(&path).unwrap();
        assert!(!w.reload_if_changed());
        assert_eq!(w.current().jurisdiction, "SN");
        std::fs::write(&path, "jurisdiction = \"MA\"\n").unwrap();
        assert!(w.reload_if_changed());
        assert_eq!(w.current().jurisdiction, "MA");
    }

    #[tokio::test]
    async fn a_fifo_in_place_of_the_file_is_refused_unopened_and_the_policy_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "jurisdiction = \"MA\"\n").unwrap();
        let w = Arc::new(PolicyWatch::new(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let reloaded = w
            .reload_off_thread(std::time::Duration::from_secs(30))
            .await;
        assert_eq!(reloaded, Some(false), "refused at once, not timed out");
        assert_eq!(w.current().jurisdiction, "MA");
        let err = PolicyWatch::new(&path).unwrap_err().to_string();
        assert!(err.contains("cannot read policy"), "{err}");
    }

    #[test]
    fn a_bad_file_at_start_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "jurisdiction = \"x\"\n").unwrap();
        assert!(matches!(
            PolicyWatch::new(&path),
            Err(PolicyError::Invalid { .. })
        ));
    }
}
