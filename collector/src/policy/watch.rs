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
    fn of(path: &Path) -> std::io::Result<FileStamp> {
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// The policy loaded from one file, reloaded by [`PolicyWatch::reload_if_changed`].
#[derive(Debug)]
pub struct PolicyWatch {
    path: PathBuf,
    current: RwLock<Arc<Policy>>,
    /// The version last looked at (valid or not); `None` when it could not be stat'ed.
    seen: Mutex<Option<FileStamp>>,
}

impl PolicyWatch {
    /// Load the file; a bad file is an error here (every problem listed).
    pub fn new(path: impl Into<PathBuf>) -> Result<Self, PolicyError> {
        let path = path.into();
        let seen = FileStamp::of(&path).ok();
        let policy = Policy::load(&path)?;
        log_warnings(&path, &policy);
        Ok(Self {
            path,
            current: RwLock::new(Arc::new(policy)),
            seen: Mutex::new(seen),
        })
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
