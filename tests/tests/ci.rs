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

/// The first line of the README's sh block after "Two commands".
fn readme_dev_command() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let after = readme.split_once("## Two commands").unwrap().1;
    let block = after.split_once("```sh\n").unwrap().1;
    block.lines().next().unwrap().trim().to_owned()
}

#[test]
fn ci_runs_the_readme_dev_command_exactly_as_written_and_asks_it_what_a_newcomer_would() {
    let command = readme_dev_command();
    assert_eq!(command, "cargo run -p sov-collector -- dev");
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert!(
        ci.lines()
            .any(|l| l.trim().starts_with("bash .ci/readme-dev")),
        ".ci/run runs .ci/readme-dev"
    );
    let script = std::fs::read_to_string(repo().join(".ci/readme-dev")).unwrap();
    let runs: Vec<&str> = script
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("cargo run -p sov-collector"))
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(
        runs[0].contains(&format!(" {command} >")),
        "readme-dev runs {:?}, the README says {command:?}",
        runs[0]
    );
    // What the dev mode prints is what the script looks for.
    assert!(script.contains(sov_collector::dev::SOVCTL_LINE_PREFIX));
    assert!(script.contains(sov_collector::dev::WEB_LINE_LABEL));
}

/// Commands of the documentation's sh blocks (continuation lines joined, comments dropped).
fn doc_commands(doc: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join(doc)).unwrap();
    let mut out = Vec::new();
    for block in text.split("```sh\n").skip(1) {
        let block = block.split("```").next().unwrap().replace("\\\n", " ");
        for line in block.lines() {
            let line = line.split("  #").next().unwrap().trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    out
}

/// Commands a person is told to type that no test can run as written, each with the reason;
/// every other command of the README and docs/OPERATOR.md must appear, as written, in
/// `.ci/run`, `.ci/readme-dev` or a test.
const NOT_RUN_AS_WRITTEN: &[(&str, &str)] = &[
    (
        "sov-collector serve --config /etc/sovereign/collector.toml",
        "runs a collector from /etc on the host; tests/tests/deploy.rs runs the deploy/ files with --check-config",
    ),
    (
        "sov-agent run --config /etc/sovereign/agent.toml",
        "runs an agent from /etc on the host; deploy.rs checks deploy/agent.toml",
    ),
    (
        "sovctl --collector https://collector.example.net:7443 --ca pki/ca.pem --cert pki/analyst.pem --key pki/analyst.key nodes",
        "an example host name; .ci/readme-dev runs the same command against the dev collector",
    ),
    (
        "sov-collector enroll-token create --config /etc/sovereign/collector.toml --count 20 --expires 24h",
        "a collector config in /etc; tests/tests/enroll.rs runs enroll-token create",
    ),
    (
        "sov-collector enroll-token create --config /etc/sovereign/collector.toml --count 50 --expires 48h",
        "a collector config in /etc; tests/tests/enroll.rs runs enroll-token create",
    ),
    (
        "sov-collector enroll-token create --config /etc/sovereign/collector.toml --replace gpu-node-01",
        "a collector config in /etc; hostile_collector.rs runs enroll-token create --replace",
    ),
    (
        "sov-agent enroll --config /etc/sovereign/agent.toml --token sovenroll-… --ca-sha256 4f0c…",
        "placeholders for a token and a fingerprint; enroll.rs runs sov-agent enroll",
    ),
    (
        "SOV_ENROLL_TOKEN=sovenroll-6b1d… sov-agent enroll --config /etc/sovereign/agent.toml --ca-sha256 4f0c…e1",
        "placeholders; enroll.rs runs sov-agent enroll",
    ),
    (
        "sovenroll-6b1d…",
        "output shown in the block, not a command",
    ),
    (
        "cargo build --release -p sov-agent -p sov-collector -p sovctl",
        "a second full build (minutes); CI builds the same packages in the debug profile",
    ),
    (
        "cargo build --profile agent -p sov-agent",
        "a third full build with LTO (minutes); CI builds the agent in the debug profile",
    ),
    (
        "sov-agent run --config /etc/sovereign/agent.toml --check-config",
        "needs /etc/sovereign; deploy.rs runs --check-config on deploy/agent.toml",
    ),
    (
        "sov-collector serve --config /etc/sovereign/collector.toml --check-config",
        "needs /etc/sovereign; deploy.rs runs --check-config on deploy/collector.toml",
    ),
];

/// Words that mark a command changing the host it runs on (installs, services, remote
/// machines, a database backup): shown for operators, never run by tests.
const HOST_CHANGING: &[&str] = &[
    "install ",
    "systemctl ",
    "scp ",
    "ssh ",
    "chmod ",
    "sqlite3 ",
    "mkdir -p pki/retired",
    "kubectl ",
    "[enroll]",
    "ca_key =",
    "validity_secs =",
];

#[test]
fn every_command_of_the_readme_and_the_operator_guide_is_run_as_written_or_says_why_not() {
    let mut runners = String::new();
    for f in [".ci/run", ".ci/readme-dev"] {
        runners.push_str(&std::fs::read_to_string(repo().join(f)).unwrap());
    }
    for dir in ["tests/tests", "tests/src"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("ci.rs") {
                runners.push_str(&std::fs::read_to_string(p).unwrap());
            }
        }
    }
    let mut unaccounted = Vec::new();
    let mut seen_exemptions = Vec::new();
    for doc in ["README.md", "docs/OPERATOR.md"] {
        for cmd in doc_commands(doc) {
            if runners.contains(&cmd) {
                continue;
            }
            if let Some((c, _)) = NOT_RUN_AS_WRITTEN.iter().find(|(c, _)| *c == cmd) {
                seen_exemptions.push(*c);
                continue;
            }
            if HOST_CHANGING.iter().any(|w| cmd.contains(w)) {
                continue;
            }
            unaccounted.push(format!("{doc}: {cmd}"));
        }
    }
    assert!(
        unaccounted.is_empty(),
        "commands nobody runs as written (run them in a test or .ci/run, or add them to NOT_RUN_AS_WRITTEN with the reason):\n{}",
        unaccounted.join("\n")
    );
    for (c, _) in NOT_RUN_AS_WRITTEN {
        assert!(
            seen_exemptions.contains(c),
            "NOT_RUN_AS_WRITTEN lists {c:?}, which no document asks for any more"
        );
    }
}
