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
    #[error("cannot read config {path}: {source}")]
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
    toml::from_str(&text).map_err(|first| ConfigError::Parse {
        path: path.to_owned(),
        message: every_toml_problem::<T>(&text, first),
    })
}

/// Most problems [`every_toml_problem`] reports from one file.
pub const MAX_TOML_PROBLEMS: usize = 50;

/// Every problem toml finds in `text`, not only the first: the line of each problem found is
/// set aside (made a comment) and the text is read again, until it reads or a problem has no
/// line of its own; at most [`MAX_TOML_PROBLEMS`]. Each problem keeps toml's own message
/// (line, column, the text and what is wrong).
pub fn every_toml_problem<T: serde::de::DeserializeOwned>(
    text: &str,
    first: toml::de::Error,
) -> String {
    let mut messages = vec![first.to_string().trim_end().to_owned()];
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut current = text.to_owned();
    let mut err = first;
    let mut set_aside = std::collections::BTreeSet::new();
    while messages.len() < MAX_TOML_PROBLEMS {
        let Some(span) = err.span() else { break };
        let line = current[..span.start.min(current.len())]
            .matches('\n')
            .count();
        // A problem of the whole document, or one at a line already set aside, ends the search.
        if span.start == 0 && span.end >= current.len().saturating_sub(1) {
            break;
        }
        if line >= lines.len() || !set_aside.insert(line) {
            break;
        }
        lines[line] = "#".to_owned();
        current = lines.join("\n");
        match toml::from_str::<T>(&current) {
            Ok(_) => break,
            Err(e) => {
                let m = e.to_string().trim_end().to_owned();
                if !messages.contains(&m) {
                    messages.push(m);
                }
                err = e;
            }
        }
    }
    if messages.len() == 1 {
        return messages.remove(0);
    }
    let n = messages.len();
    let mut out = format!("{n} problems");
    for (i, m) in messages.iter().enumerate() {
        out.push_str(&format!("\n[{}/{n}] {m}", i + 1));
    }
    out
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
    fn every_toml_problem_is_listed_not_only_the_first() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct C {
            a: Option<u32>,
            b: Option<String>,
            c: Option<u32>,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        std::fs::write(
            &path,
            "a = \"not a number\"\nb = \"fine\"\nc = = 3\nd = 4\n",
        )
        .unwrap();
        let err = read_toml::<C>(&path).unwrap_err().to_string();
        assert!(err.contains("3 problems"), "{err}");
        for line in ["line 1", "line 3", "line 4"] {
            assert!(err.contains(line), "{line} missing from {err}");
        }
        assert!(err.contains("unknown field `d`"), "{err}");
    }

    #[test]
    fn an_unreadable_config_says_why() {
        let err = read_toml::<toml::Table>(Path::new("/nonexistent/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("No such file or directory"), "{err}");
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
