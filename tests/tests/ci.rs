//! The README's test command is the one `.ci/run` runs, and `.ci/run` keeps going after a
//! failing test binary and prints the skipped tests.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The first line of the README's sh block after "Run the whole test suite".
fn readme_test_command() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let after = readme
        .split_once("Run the whole test suite")
        .expect("README names the test suite command")
        .1;
    let block = after.split_once("```sh\n").unwrap().1;
    block.lines().next().unwrap().trim().to_owned()
}

#[test]
fn the_readme_test_command_is_exactly_what_ci_runs_and_it_does_not_stop_at_the_first_failure() {
    let command = readme_test_command();
    assert!(
        command.contains("--no-fail-fast"),
        "{command}: a failing test binary must not hide the later ones"
    );
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    let runs: Vec<&str> = ci
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("cargo test"))
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(
        runs[0] == command || runs[0].starts_with(&format!("{command} ||")),
        ".ci/run runs {:?}, the README says {command:?}",
        runs[0]
    );
    assert!(
        ci.contains(sov_agent::skipped::SKIPPED_FILE),
        ".ci/run prints the skipped tests"
    );
}
