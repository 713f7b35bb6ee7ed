//! The command lines as an operator uses them: exit codes, files, output formats.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use sov_collector::auth::Role;
use sov_e2e::{InProcessCollector, Pki, bin_path, push_client, report};

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path(bin))
        .args(args)
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_agent_config_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "collector = \"http://nowhere\"\ninterval_secs = 0\nmax_spool_bytes = 10\n[node]\nsite = \"\"\ncountry = \"Morocco\"\n[tls]\nca = \"/no/ca.pem\"\ncert = \"/no/a.pem\"\nkey = \"/no/a.key\"\n",
    )
    .unwrap();
    let (code, _, err) = run(
        "e2e-agent",
        &["run", "--config", cfg.to_str().unwrap(), "--check-config"],
    );
    assert_eq!(code, 64, "{err}");
    for field in [
        "collector[0]",
        "interval_secs",
        "max_spool_bytes",
        "node.site",
        "node.country",
        "tls.ca",
        "tls.cert",
        "tls.key",
    ] {
        assert!(err.contains(field), "{field} not reported in:\n{err}");
    }
    std::fs::write(&cfg, "colector = \"https://x:1\"\n").unwrap();
    let (code, _, err) = run(
        "e2e-agent",
        &["run", "--config", cfg.to_str().unwrap(), "--check-config"],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("colector"), "{err}");
}

#[test]
fn a_bad_collector_config_exits_64_and_a_good_one_passes_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("collector.toml");
    std::fs::write(
        &cfg,
        "listen = \"nowhere\"\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n",
    )
    .unwrap();
    let (code, _, err) = run(
        "e2e-collector",
        &["serve", "--config", cfg.to_str().unwrap(), "--check-config"],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("listen"), "{err}");

    let pki = Pki::new();
    let good = sov_collector::CollectorConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("data"),
        pki.server_files(),
    );
    sov_e2e::write_collector_toml(&good, &cfg);
    let (code, out, err) = run(
        "e2e-collector",
        &["serve", "--config", cfg.to_str().unwrap(), "--check-config"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid"), "{out}");
}

#[test]
fn pki_init_and_issue_write_certificates_with_private_keys_readable_by_the_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("pki");
    let d_arg = d.to_str().unwrap();
    let (code, _, err) = run(
        "e2e-collector",
        &[
            "pki",
            "init",
            "--dir",
            d_arg,
            "--san",
            "collector.example",
            "--san",
            "10.1.2.3",
        ],
    );
    assert_eq!(code, 0, "{err}");
    for f in ["ca.pem", "ca.key", "collector.pem", "collector.key"] {
        assert!(d.join(f).exists(), "{f} missing");
    }
    let (code, _, err) = run(
        "e2e-collector",
        &[
            "pki", "issue", "--dir", d_arg, "--role", "agent", "--name", "gpu-01",
        ],
    );
    assert_eq!(code, 0, "{err}");
    for key in ["ca.key", "collector.key", "gpu-01.key"] {
        let mode = std::fs::metadata(d.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key} has mode {mode:o}");
    }
    let pem = std::fs::read(d.join("gpu-01.pem")).unwrap();
    let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let der = der.contents;
    let id = sov_collector::auth::identity_from_der(&der, "sovereign").unwrap();
    assert_eq!((id.name.as_str(), id.role), ("gpu-01", Role::Agent));
    // A second init refuses to replace the CA; a bad role is refused.
    let (code, _, err) = run("e2e-collector", &["pki", "init", "--dir", d_arg]);
    assert_ne!(code, 0);
    assert!(err.contains("already"), "{err}");
    let (code, _, err) = run(
        "e2e-collector",
        &[
            "pki", "issue", "--dir", d_arg, "--role", "pirate", "--name", "x",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("pirate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sovctl_nodes_prints_json_csv_and_a_table_with_the_documented_keys() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |_| {}).await;
    let url = collector.url();
    let mut a = push_client(&pki.client_tls(Role::Agent, "node-a"), &url)
        .await
        .unwrap();
    for seq in [1, 2, 4] {
        a.push(report("node-a", 1, seq)).await.unwrap();
    }
    let reg = pki.client(Role::Regulator, "alice");
    let ca = pki.ca.to_str().unwrap().to_owned();
    let cert = reg.cert.to_str().unwrap().to_owned();
    let key = reg.key.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        let base = [
            "--collector",
            url.as_str(),
            "--ca",
            ca.as_str(),
            "--cert",
            cert.as_str(),
            "--key",
            key.as_str(),
        ];
        let mut res = Vec::new();
        for fmt in ["json", "csv", "table"] {
            let mut args: Vec<&str> = base.to_vec();
            args.extend(["--output", fmt, "nodes"]);
            res.push(run("e2e-sovctl", &args));
        }
        res
    })
    .await
    .unwrap();
    let (code, json, err) = &out[0];
    assert_eq!(*code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let n = &v.as_array().unwrap()[0];
    for k in [
        "node",
        "site",
        "country",
        "last_seen",
        "reports",
        "last_seq",
        "missing",
    ] {
        assert!(n.get(k).is_some(), "key {k} missing in {n}");
    }
    assert_eq!(
        (
            n["node"].as_str(),
            n["reports"].as_u64(),
            n["last_seq"].as_u64(),
            n["missing"].as_u64()
        ),
        (Some("node-a"), Some(3), Some(4), Some(1))
    );
    let (code, csv, _) = &out[1];
    assert_eq!(*code, 0);
    assert!(
        csv.starts_with("node,site,country,last_seen,reports,last_seq,missing"),
        "{csv}"
    );
    assert!(
        csv.lines()
            .nth(1)
            .unwrap()
            .starts_with("node-a,rabat-1,MA,"),
        "{csv}"
    );
    let (code, table, _) = &out[2];
    assert_eq!(*code, 0);
    assert!(table.starts_with("NODE"), "{table}");
    assert!(table.contains("node-a"), "{table}");
    collector.stop().await;
}

/// `(logical CPUs, MemTotal bytes)` as /proc tells them.
fn proc_facts() -> (u64, u64) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count() as u64;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    (cpus, kib * 1024)
}

#[test]
fn scan_json_reports_this_machines_cpus_memory_and_why_gpus_are_unavailable() {
    let (code, out, err) = run("e2e-agent", &["scan", "--json", "--window-ms", "200"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (cpus, mem) = proc_facts();
    assert_eq!(
        v["host"]["logical_cpus"].as_u64(),
        Some(cpus),
        "{}",
        v["host"]
    );
    assert_eq!(
        v["host"]["memory_total_bytes"].as_u64(),
        Some(mem),
        "{}",
        v["host"]
    );
    let used = v["host"]["memory_used_bytes"].as_u64().unwrap();
    assert!(used > 0 && used < mem);
    let procs = v["processes"].as_array().unwrap();
    assert!(!procs.is_empty());
    for k in ["pid", "name", "exe", "cpu_percent", "rss_bytes"] {
        assert!(procs[0].get(k).is_some(), "process key {k} missing");
    }
    if std::path::Path::new("/proc/driver/nvidia").exists() {
        eprintln!("NVIDIA driver present: skipping the no-GPU assertions");
        return;
    }
    assert_eq!(v["gpu"]["state"], "unavailable", "{}", v["gpu"]);
    assert!(!v["gpu"]["reason"].as_str().unwrap().is_empty());
    assert_eq!(v["gpu"]["devices"].as_array().unwrap().len(), 0);
    // The table says the same in one line.
    let (code, table, _) = run("e2e-agent", &["scan", "--window-ms", "100"]);
    assert_eq!(code, 0);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("GPU     unavailable: ")),
        "{table}"
    );
}

#[test]
fn geo_lookup_prints_country_asn_org_and_source_and_normalises_mapped_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let cfg = sov_collector::CollectorConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("data"),
        pki.server_files(),
    );
    let path = dir.path().join("collector.toml");
    sov_e2e::write_collector_toml(&cfg, &path);
    let text = std::fs::read_to_string(&path).unwrap()
        + "\n[[geo.override]]\ncidr = \"10.9.0.0/16\"\ncountry = \"FR\"\nasn = 64501\norg = \"Override Org\"\n";
    std::fs::write(&path, text).unwrap();
    let (code, out, err) = run(
        "e2e-collector",
        &[
            "geo",
            "lookup",
            "--config",
            path.to_str().unwrap(),
            "--output",
            "json",
            "8.8.8.8",
            "::ffff:8.8.8.8",
            "10.9.1.2",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        for k in ["ip", "country", "asn", "org", "source"] {
            assert!(r.get(k).is_some(), "key {k} missing in {r}");
        }
    }
    assert_eq!(
        rows[0]["country"], rows[1]["country"],
        "a mapped address is looked up as IPv4"
    );
    assert_eq!(
        rows[0]["country"].as_str().map(str::len),
        Some(2),
        "{}",
        rows[0]
    );
    assert_eq!(
        (rows[2]["country"].as_str(), rows[2]["asn"].as_u64()),
        (Some("FR"), Some(64_501))
    );
    assert!(
        rows[2]["source"].as_str().unwrap().starts_with("override"),
        "{}",
        rows[2]
    );
    // A bad address is named.
    let (code, _, err) = run("e2e-collector", &["geo", "lookup", "not-an-ip"]);
    assert_ne!(code, 0);
    assert!(err.contains("not-an-ip"), "{err}");
}
