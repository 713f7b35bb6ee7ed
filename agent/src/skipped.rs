//! Test support: a test that skips (a missing service, a kernel feature the machine lacks) says
//! so where a person sees it. `cargo test` captures a passing test's output, so an `eprintln!`
//! alone reads as a pass; [`record`] also appends one line to [`SKIPPED_FILE`] in the Cargo
//! target directory, which `.ci/run` empties before the tests and prints after them.
//!
//! Used by the tests of every crate in the workspace (the agent's own, the collector's and
//! `sov-e2e`); nothing in the agent's running code calls it.

use std::io::Write as _;
use std::path::PathBuf;

/// File name, in the target directory, of the list of skipped tests.
pub const SKIPPED_FILE: &str = "sov-skipped-tests.txt";

/// Says loudly that `test` skipped and why: on stderr, and as a line in the target directory's
/// [`SKIPPED_FILE`] (`<test>: <reason>`).
pub fn record(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(path) = skipped_file() {
        append(&path, test, reason);
    }
}

fn append(path: &std::path::Path, test: &str, reason: &str) {
    let line = format!("{test}: {reason}");
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{}", line.replace('\n', " ")));
    if let Err(e) = appended {
        eprintln!("cannot note the skip in {}: {e}", path.display());
    }
}

/// `$CARGO_TARGET_DIR/sov-skipped-tests.txt`, else the `target` directory that holds the
/// running test executable (`target/<profile>/deps/<test>`).
pub fn skipped_file() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(dir).join(SKIPPED_FILE));
    }
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    let target = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent()?.parent()?
    } else {
        deps.parent()?
    };
    Some(target.join(SKIPPED_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_of_skipped_tests_lives_in_the_target_directory() {
        let path = skipped_file().expect("a path");
        assert!(path.ends_with(SKIPPED_FILE));
        // This test itself runs from <target>/<profile>/deps/.
        let target = path.parent().expect("dir");
        assert!(
            target.join("debug").is_dir()
                || target.join("release").is_dir()
                || std::env::var_os("CARGO_TARGET_DIR").is_some(),
            "{}",
            path.display()
        );
    }

    #[test]
    fn each_skip_is_one_line_naming_the_test_and_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(SKIPPED_FILE);
        append(&path, "a::b", "no tmpfs\n(permission denied)");
        append(&path, "c", "no chromium");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "a::b: no tmpfs (permission denied)\nc: no chromium\n");
    }
}
