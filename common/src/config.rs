//! Configuration files: strict TOML read with messages that name the file, and a validation
//! pass that gathers every problem ([`Problems`]) before anything is refused.

use std::fmt;
use std::path::{Path, PathBuf};

/// Exit code for a bad configuration (EX_CONFIG from sysexits.h is 78; EX_USAGE 64 is what
/// operators of our peers expect from `--check-config`).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Every problem found in a configuration, each naming the field and the bad value.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<String>);

impl Problems {
    /// Record one problem.
    pub fn push(&mut self, field: &str, msg: impl fmt::Display) {
        self.0.push(format!("{field}: {msg}"));
    }
    /// True when nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Ok when empty, else the problems as an error.
    pub fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self))
        }
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config {path} is not valid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said, with line and column.
        message: String,
    },
    /// The values are wrong; every problem is listed.
    #[error("invalid configuration:\n{0}")]
    Invalid(Problems),
}

/// Read a TOML file into `T` with a message that names the file.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Check that `path` names a readable file.
pub fn check_readable(problems: &mut Problems, field: &str, path: &Path) {
    if let Err(e) = std::fs::File::open(path) {
        problems.push(field, format!("cannot read {}: {e}", path.display()));
    }
}

/// The words that mark a private key readable by group or others in a [`Problems`] entry.
pub const INSECURE_KEY_MARK: &str = "is readable by group or others";

/// Check that a private key file is readable by its owner only, as ssh does: a key that group
/// or others can read may already be someone else's. A missing file is `check_readable`'s
/// business.
pub fn check_private_key(problems: &mut Problems, field: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        problems.push(
            field,
            format!(
                "{} {INSECURE_KEY_MARK} (mode {mode:04o}): run `chmod 600 {}`, or pass \
                 --allow-insecure-keys to run anyway with a warning",
                path.display(),
                path.display()
            ),
        );
    }
}

/// Check an ISO 3166-1 alpha-2 code (two upper-case ASCII letters).
pub fn check_country(problems: &mut Problems, field: &str, value: &str) {
    if value.len() != 2 || !value.bytes().all(|b| b.is_ascii_uppercase()) {
        problems.push(
            field,
            format!(
                "{value:?} is not an ISO 3166-1 alpha-2 code (two upper-case letters, e.g. \"MA\")"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_listed_with_its_field() {
        let mut p = Problems::default();
        check_country(&mut p, "node.country", "Morocco");
        check_readable(&mut p, "tls.ca", Path::new("/nonexistent/ca.pem"));
        let text = ConfigError::Invalid(p).to_string();
        assert!(text.contains("node.country: \"Morocco\""), "{text}");
        assert!(
            text.contains("tls.ca: cannot read /nonexistent/ca.pem"),
            "{text}"
        );
    }

    #[test]
    fn a_toml_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        std::fs::write(&path, "a = ").unwrap();
        let err = read_toml::<toml::Table>(&path).unwrap_err().to_string();
        assert!(err.contains("x.toml"), "{err}");
    }
}
