//! The documentation's commands that run anywhere, run exactly as written (in a temporary
//! directory, with the binaries on PATH under the names people type). `tests/tests/ci.rs`
//! checks that every command of the README and docs/OPERATOR.md is run as written somewhere,
//! here among others, or says why it cannot be.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;

use sov_e2e::bin_path;

/// A directory whose `sov-collector`, `sov-agent` and `sovctl` are this build's binaries.
fn path_with_binaries(dir: &Path) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, built) in [
        ("sov-collector", "e2e-collector"),
        ("sov-agent", "e2e-agent"),
        ("sovctl", "e2e-sovctl"),
    ] {
        std::os::unix::fs::symlink(bin_path(built), bin.join(name)).unwrap();
    }
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Run `command` with `sh -c` in `dir`; its stdout, or a panic with everything it said.
fn sh(dir: &Path, path: &str, command: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", command])
        .current_dir(dir)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{command}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_readme_pki_commands_run_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_with_binaries(dir.path());
    for command in [
        "sov-collector pki init --dir pki --san collector.example.net",
        "sov-collector pki issue --dir pki --role agent --name gpu-node-01",
        "sov-collector pki issue --dir pki --role regulator --name analyst",
    ] {
        sh(dir.path(), &path, command);
    }
    for f in [
        "ca.pem",
        "collector.pem",
        "gpu-node-01.pem",
        "gpu-node-01.key",
        "analyst.pem",
        "analyst.key",
    ] {
        assert!(dir.path().join("pki").join(f).exists(), "pki/{f}");
    }
}

#[test]
fn the_operator_guide_pki_commands_run_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_with_binaries(dir.path());
    sh(
        dir.path(),
        &path,
        "sov-collector pki init --dir pki --san collector.example.net --san 10.0.0.5",
    );
    sh(
        dir.path(),
        &path,
        "sov-collector pki issue --dir pki --role agent --name gpu-node-01",
    );
    let pem = std::fs::read_to_string(dir.path().join("pki/collector.pem")).unwrap();
    assert!(pem.contains("BEGIN CERTIFICATE"));
    assert!(dir.path().join("pki/gpu-node-01.key").exists());
}
