//! Enrollment without copying keys, with real processes: `sov-collector enroll-token create`
//! makes tokens, `sov-agent enroll` gets a certificate with one (pinning the CA by its hash),
//! the agent reports with it and renews it before it expires, without a restart.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use sov_collector::auth::{DEFAULT_TRUST_DOMAIN, Role};
use sov_e2e::{
    AgentProcess, CollectorProcess, Pki, agent_config, bin_path, eventually, free_port, node,
    write_agent_toml,
};

/// Lifetime of the certificates the collector signs here: renewal is due after about 13 s.
const VALIDITY_SECS: u64 = 20;

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin_path(bin))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An agent configuration for `name` whose `[tls]` files live (or will) under `dir`.
fn agent_toml(pki: &Pki, name: &str, url: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let mut cfg = agent_config(pki, name, vec![url.to_owned()], &dir.join("spool"));
    cfg.tls.ca = dir.join("tls/ca.pem");
    cfg.tls.cert = dir.join("tls/node.pem");
    cfg.tls.key = dir.join("tls/node.key");
    let path = dir.join("agent.toml");
    write_agent_toml(&cfg, &path);
    (path, cfg.tls.cert)
}

fn enroll(config: &Path, token: &str, pin: &str) -> Output {
    run(
        "e2e-agent",
        &[
            "enroll",
            "--config",
            config.to_str().unwrap(),
            "--token",
            token,
            "--ca-sha256",
            pin,
        ],
    )
}

fn not_after(cert: &Path) -> SystemTime {
    sov_agent::enroll::validity(&std::fs::read(cert).unwrap())
        .unwrap()
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_enrolls_with_a_token_reports_and_renews_its_certificate_without_a_restart() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let ca_key = pki.dir.path().join("ca.key");
    let tweak = |c: &mut sov_collector::config::CollectorConfig| {
        c.enroll.ca_key = Some(ca_key.clone());
        c.enroll.validity_secs = VALIDITY_SECS;
    };
    let mut collector = CollectorProcess::start_with(&pki, work.path(), port, tweak);
    let url = collector.url();

    // Two tokens; the output starts with the CA's sha256.
    let cfg = work.path().join("collector.toml");
    let out = run(
        "e2e-collector",
        &[
            "enroll-token",
            "create",
            "--config",
            cfg.to_str().unwrap(),
            "--count",
            "2",
            "--expires",
            "1h",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let pin = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# ca-sha256 "))
        .unwrap()
        .to_owned();
    let tokens: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(tokens.len(), 2, "{stdout}");
    let ca_der = rustls_der(&pki.ca);
    assert_eq!(pin, sov_agent::enroll::sha256_hex(&ca_der));

    let node_dir = tempfile::tempdir().unwrap();
    let (agent_cfg, cert) = agent_toml(&pki, "enrolled-1", &url, node_dir.path());

    // A wrong CA hash: refused before the token is sent, nothing written, token still good.
    let wrong = "00".repeat(32);
    let out = enroll(&agent_cfg, tokens[0], &wrong);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("--ca-sha256"), "{}", text(&out));
    assert!(!node_dir.path().join("tls").exists());

    // The right hash: the key is made here (0600) and the certificate is an agent's.
    let out = enroll(&agent_cfg, tokens[0], &pin);
    assert!(out.status.success(), "{}", text(&out));
    let key = node_dir.path().join("tls/node.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let der = rustls_der(&cert);
    let id = sov_collector::auth::identity_from_der(&der, DEFAULT_TRUST_DOMAIN).unwrap();
    assert_eq!((id.role, id.name.as_str()), (Role::Agent, "enrolled-1"));
    assert_eq!(rustls_der(&node_dir.path().join("tls/ca.pem")), ca_der);

    // The same token a second time, for another node: refused, naming why.
    let other_dir = tempfile::tempdir().unwrap();
    let (other_cfg, other_cert) = agent_toml(&pki, "enrolled-2", &url, other_dir.path());
    let out = enroll(&other_cfg, tokens[0], &pin);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("already used"), "{}", text(&out));
    assert!(!other_cert.exists());

    // The enrolled agent reports with its certificate.
    let log = work.path().join("agent.log");
    let _agent = AgentProcess::start(&agent_cfg, &log);
    eventually(
        Duration::from_secs(30),
        "the enrolled node reporting",
        || async {
            node(&pki, &url, "enrolled-1")
                .await
                .filter(|n| n.last_seq >= 1)
                .map(|_| ())
        },
    )
    .await;

    // It renews before the certificate expires: the file changes under the running process.
    let key_before = std::fs::read(&key).unwrap();
    let first_expiry = not_after(&cert);
    eventually(
        Duration::from_secs(2 * VALIDITY_SECS),
        "the certificate renewed",
        || async { (not_after(&cert) > first_expiry).then_some(()) },
    )
    .await;
    // Renewal keeps the node's key: it never left the node and is not replaced.
    assert_eq!(std::fs::read(&key).unwrap(), key_before);

    // Once the first certificate has expired, a fresh handshake needs the renewed one:
    // restart the collector (same port and data) and see the same agent process go on.
    let wait = first_expiry
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        + Duration::from_secs(1);
    tokio::time::sleep(wait).await;
    collector.kill9();
    let collector = CollectorProcess::start_with(&pki, work.path(), port, tweak);
    let before = node(&pki, &collector.url(), "enrolled-1")
        .await
        .unwrap()
        .last_seq;
    eventually(
        Duration::from_secs(30),
        "reports after the old certificate expired",
        || async {
            node(&pki, &collector.url(), "enrolled-1")
                .await
                .filter(|n| n.last_seq >= before + 3)
                .map(|_| ())
        },
    )
    .await;
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("client certificate renewed"),
        "{log_text}"
    );
}

/// The first certificate in a PEM file, DER.
fn rustls_der(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    pem.contents
}
