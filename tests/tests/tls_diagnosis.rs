//! TLS failures said in plain words, on both sides, with real processes and certificates:
//! `--check-config` of the agent and the collector finds an expired certificate (with its
//! date), one from another CA and a key that is not the certificate's; a running agent whose
//! certificate the collector refuses logs why (expired, signed by another CA, revoked), and
//! one that asks for the wrong name says "name mismatch"; the collector logs every refused
//! handshake with the peer's address and the same reason. Each binary names itself, and an
//! unreadable configuration says why.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sov_collector::auth::Role;
use sov_collector::pki::PathPair;
use sov_e2e::{
    AgentProcess, CollectorProcess, Pki, agent_config, bin_path, free_port, write_agent_toml,
    write_collector_toml,
};

/// Longest wait for a log line (the agent retries with a 1 s backoff cap).
const LOG_WAIT: Duration = Duration::from_secs(60);

fn run(bin: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin_path(bin)).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Wait until `log` holds a line with every one of `words`; that line.
fn wait_for_line(log: &Path, words: &[&str]) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| words.iter().all(|w| l.contains(w))) {
            return l.to_owned();
        }
        assert!(
            start.elapsed() < LOG_WAIT,
            "no line with {words:?} in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn expired(pki: &Pki, name: &str) -> PathPair {
    let pair = pki.client_with(Role::Agent, name, |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 3, 4);
    });
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&pair.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    pair
}

#[test]
fn agent_check_config_names_an_expired_certificate_another_ca_and_a_wrong_key() {
    let pki = Pki::new();
    let other = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let check = |cert: PathPair, key: &Path, file: &str| {
        let mut cfg = agent_config(&pki, "n", vec!["https://127.0.0.1:1".into()], dir.path());
        cfg.tls.cert = cert.cert;
        cfg.tls.key = key.to_owned();
        let path = dir.path().join(file);
        write_agent_toml(&cfg, &path);
        run(
            "e2e-agent",
            &["run", "--config", path.to_str().unwrap(), "--check-config"],
        )
    };
    let good = pki.client(Role::Agent, "good");
    let (code, out) = check(good.clone(), &good.key, "good.toml");
    assert_eq!(code, 0, "{out}");

    let old = expired(&pki, "old-node");
    let (code, out) = check(old.clone(), &old.key, "expired.toml");
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("expired on 2021-03-04T00:00:00Z"),
        "the date is given: {out}"
    );
    assert!(out.starts_with("sov-agent:"), "{out}");

    let foreign = other.client(Role::Agent, "foreign");
    let (code, out) = check(foreign.clone(), &foreign.key, "other-ca.toml");
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("signed by another CA"), "{out}");

    let (code, out) = check(good, &foreign.key, "wrong-key.toml");
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("tls.key") && out.contains("does not match"),
        "{out}"
    );
}

#[test]
fn collector_check_config_names_an_expired_certificate_and_a_wrong_key_and_notes_another_ca() {
    let pki = Pki::new();
    let other = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let check = |cert: &Path, key: &Path, file: &str| {
        let mut cfg = sov_collector::config::CollectorConfig::new(
            "127.0.0.1:1".parse().unwrap(),
            dir.path().join("data"),
            pki.server_files(),
        );
        cfg.tls.cert = cert.to_owned();
        cfg.tls.key = key.to_owned();
        let path = dir.path().join(file);
        write_collector_toml(&cfg, &path);
        run(
            "e2e-collector",
            &[
                "serve",
                "--config",
                path.to_str().unwrap(),
                "--check-config",
            ],
        )
    };
    let (code, out) = check(&pki.collector.cert, &pki.collector.key, "good.toml");
    assert_eq!(code, 0, "{out}");
    let old = expired(&pki, "old-collector");
    let (code, out) = check(&old.cert, &old.key, "expired.toml");
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("expired on 2021-03-04T00:00:00Z"), "{out}");
    assert!(
        out.starts_with("sov-collector:"),
        "the binary names itself: {out}"
    );
    let (code, out) = check(&pki.collector.cert, &other.collector.key, "wrong-key.toml");
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("does not match"), "{out}");
    // A server certificate from another CA than the clients' is allowed, and said.
    let (code, out) = check(&other.collector.cert, &other.collector.key, "other.toml");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("note:") && out.contains("signed by another CA"),
        "{out}"
    );
}

#[test]
fn an_unreadable_or_broken_config_says_why_and_which_binary_speaks() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run(
        "e2e-collector",
        &["serve", "--config", "/nonexistent/collector.toml"],
    );
    assert_eq!(code, 64, "{out}");
    assert!(
        out.starts_with("sov-collector: cannot read config /nonexistent/collector.toml: No such file or directory"),
        "{out}"
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = = 1\nmax_page = \"many\"\nbogus = 3\n").unwrap();
    let (code, out) = run(
        "e2e-collector",
        &["serve", "--config", bad.to_str().unwrap(), "--check-config"],
    );
    assert_eq!(code, 64, "{out}");
    for line in ["line 1", "line 2", "line 3"] {
        assert!(
            out.contains(line),
            "every problem is listed ({line}): {out}"
        );
    }
    let (code, out) = run("e2e-agent", &["run", "--config", "/nonexistent/agent.toml"]);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.starts_with("sov-agent: cannot read config")
            && out.contains("No such file or directory"),
        "{out}"
    );
}

#[test]
fn a_refused_agent_logs_the_reason_in_plain_words_and_the_collector_logs_the_peer_and_reason() {
    let pki = Pki::new();
    let other = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let revoked = pki.client(Role::Agent, "cut-off");
    let deny = work.path().join("revoked.txt");
    std::fs::write(
        &deny,
        format!(
            "{}\n",
            sov_collector::tls::fingerprint_hex(&pem_der(&revoked.cert))
        ),
    )
    .unwrap();
    let port = free_port();
    let collector = CollectorProcess::start_with(&pki, work.path(), port, |c| {
        c.tls.revoked = Some(deny.clone());
    });
    let collector_log = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.to_string_lossy().contains("collector-") && p.extension().is_some_and(|x| x == "log")
        })
        .unwrap();

    let cases: Vec<(&str, PathPair, Option<&str>, &str, &str)> = vec![
        (
            "other-ca",
            other.client(Role::Agent, "stranger"),
            None,
            "signed by another CA",
            "signed by another CA",
        ),
        (
            "expired",
            expired(&pki, "expired-node"),
            None,
            "the peer refused our certificate: expired",
            "expired on 2021-03-04T00:00:00Z",
        ),
        (
            "revoked",
            revoked.clone(),
            None,
            "the peer refused our certificate: revoked",
            "revoked",
        ),
        (
            "wrong-name",
            pki.client(Role::Agent, "wrong-name"),
            Some("collector.example.net"),
            "name mismatch",
            "",
        ),
    ];
    for (case, pair, server_name, agent_says, collector_says) in cases {
        let mut cfg = agent_config(&pki, case, vec![collector.url()], &work.path().join(case));
        cfg.tls.cert = pair.cert;
        cfg.tls.key = pair.key;
        if let Some(n) = server_name {
            cfg.tls.server_name = Some(n.to_owned());
        }
        let cfg_path = work.path().join(format!("{case}.toml"));
        write_agent_toml(&cfg, &cfg_path);
        let log = work.path().join(format!("agent-{case}.log"));
        let mut agent = AgentProcess::start(&cfg_path, &log);
        let line = wait_for_line(&log, &["TLS refused", agent_says]);
        assert!(
            !line.contains("operation was canceled:") || line.contains(agent_says),
            "{line}"
        );
        if !collector_says.is_empty() {
            let line = wait_for_line(&collector_log, &["tls handshake refused", collector_says]);
            assert!(
                line.contains("peer.addr=127.0.0.1:"),
                "the peer is named: {line}"
            );
        }
        agent.kill9();
    }
    drop(collector);
}

/// The DER bytes of the first certificate of a PEM file.
fn pem_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .as_ref()
        .to_vec()
}
