//! The files in `deploy/` as an operator installs them: the example configurations and the ones
//! in the Kubernetes ConfigMaps pass `--check-config` once their certificates exist, and the
//! systemd units are valid, hardened, and start the binaries with arguments the CLIs accept.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use sov_collector::auth::Role;
use sov_e2e::{Pki, bin_path};

/// The repository root (this package is `tests/`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

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

/// Which side a configuration belongs to: decides which generated files replace its paths.
#[derive(Clone, Copy)]
enum Side {
    Agent,
    Collector,
}

/// `toml` with every `"/etc/sovereign/…"` string replaced by a file of `pki` (CA for
/// `ca.pem`, the side's certificate for another `.pem`, its key for `.key`) and the state
/// directory prefix replaced by `state`. Panics when no TLS path was found (the test would
/// prove nothing) or when an `/etc/sovereign` path is left over.
fn localise(toml: &str, side: Side, pki: &Pki, state: &Path) -> String {
    localise_with(toml, side, pki, state, &[])
}

/// [`localise`], with `"/etc/sovereign-config/NAME"` strings (files of the same ConfigMap)
/// replaced by the paths given in `files`.
fn localise_with(
    toml: &str,
    side: Side,
    pki: &Pki,
    state: &Path,
    files: &[(&str, PathBuf)],
) -> String {
    let mut toml = toml.to_owned();
    for (name, path) in files {
        toml = toml.replace(
            &format!("\"/etc/sovereign-config/{name}\""),
            &format!("{:?}", path.display().to_string()),
        );
    }
    let toml = toml.as_str();
    let (pair, state_prefix) = match side {
        Side::Agent => (pki.client(Role::Agent, "deploy-node"), "/var/lib/sov-agent"),
        Side::Collector => (pki.collector.clone(), "/var/lib/sov-collector"),
    };
    let mut replaced = 0;
    let mut out = String::new();
    for line in toml.lines() {
        let mut line = line.to_owned();
        let trimmed = line.trim_start();
        if !trimmed.starts_with('#') {
            if let Some(start) = line.find("\"/etc/sovereign/") {
                let end = start + 1 + line[start + 1..].find('"').unwrap();
                let old = &line[start + 1..end];
                let new = if old.ends_with("/ca.pem") {
                    &pki.ca
                } else if old.ends_with(".pem") {
                    &pair.cert
                } else if old.ends_with(".key") {
                    &pair.key
                } else {
                    panic!("unexpected /etc/sovereign path {old}");
                };
                line = format!("{}{}{}", &line[..=start], new.display(), &line[end..]);
                replaced += 1;
            }
            line = line.replace(
                &format!("\"{state_prefix}"),
                &format!("\"{}", state.display()),
            );
        }
        out.push_str(&line);
        out.push('\n');
    }
    assert!(replaced >= 3, "expected ca, cert and key paths in:\n{toml}");
    assert!(
        !out.lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("/etc/sovereign")),
        "an /etc/sovereign path is left in:\n{out}"
    );
    out
}

/// Write `toml` (localised) to a temporary file and run the side's binary with `--check-config`.
fn assert_passes_check(name: &str, toml: &str, side: Side) {
    assert_passes_check_with(name, toml, side, &[]);
}

/// [`assert_passes_check`], with the ConfigMap's other files `(name, content)` written beside
/// it and named by their paths.
fn assert_passes_check_with(name: &str, toml: &str, side: Side, others: &[(&str, String)]) {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = dir.path().join("config.toml");
    let files: Vec<(&str, PathBuf)> = others
        .iter()
        .map(|(n, content)| {
            let p = dir.path().join(n);
            std::fs::write(&p, content).unwrap();
            (*n, p)
        })
        .collect();
    std::fs::write(&cfg, localise_with(toml, side, &pki, &state, &files)).unwrap();
    let cfg = cfg.to_str().unwrap();
    let (bin, args) = match side {
        Side::Agent => ("e2e-agent", ["run", "--config", cfg, "--check-config"]),
        Side::Collector => (
            "e2e-collector",
            ["serve", "--config", cfg, "--check-config"],
        ),
    };
    let (code, out, err) = run(bin, &args);
    assert_eq!(code, 0, "{name} fails --check-config:\n{err}");
    assert!(out.contains("configuration is valid"), "{name}: {out}");
}

/// The block scalar under `key: |` in a YAML file, de-indented (simple string handling: the
/// block is every following line indented deeper than the key, or blank).
fn yaml_block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines();
    let header = lines
        .by_ref()
        .find(|l| l.trim_start() == format!("{key}: |"))
        .unwrap_or_else(|| panic!("no `{key}: |` block"));
    let key_indent = header.len() - header.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key_indent)
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap();
    let mut out = String::new();
    for l in body {
        out.push_str(l.get(indent..).unwrap_or(""));
        out.push('\n');
    }
    out
}

#[test]
fn the_example_configurations_pass_check_config_with_real_certificates() {
    assert_passes_check("deploy/agent.toml", &read("deploy/agent.toml"), Side::Agent);
    assert_passes_check(
        "deploy/collector.toml",
        &read("deploy/collector.toml"),
        Side::Collector,
    );
}

#[test]
fn the_kubernetes_configmaps_pass_check_config_with_real_certificates() {
    let agent = yaml_block(
        &read("deploy/kubernetes/agent-daemonset.yaml"),
        "agent.toml",
    );
    assert!(agent.contains("[tls]"), "{agent}");
    assert_passes_check("the agent ConfigMap", &agent, Side::Agent);

    let deployment = read("deploy/kubernetes/collector-deployment.yaml");
    let collector = yaml_block(&deployment, "collector.toml");
    assert!(collector.contains("[tls]"), "{collector}");
    // What a regulator and an operator need is in the ConfigMap: the console, a policy, an
    // alert sink, enrollment for the DaemonSet, a revocation list.
    for wanted in [
        "[http]",
        "listen = \"0.0.0.0:8443\"",
        "policy = ",
        "[[alert.",
        "[enroll]",
        "revoked = ",
    ] {
        assert!(
            collector.contains(wanted),
            "the collector ConfigMap lacks {wanted}"
        );
    }
    let policy = yaml_block(&deployment, "policy.toml");
    let revoked = yaml_block(&deployment, "revoked.txt");
    assert_passes_check_with(
        "the collector ConfigMap",
        &collector,
        Side::Collector,
        &[("policy.toml", policy), ("revoked.txt", revoked)],
    );
    // 8443 wherever ports are listed.
    let service = read("deploy/kubernetes/collector-service.yaml");
    for port in ["port: 7443", "port: 8443"] {
        assert!(service.contains(port), "the Service must expose {port}");
    }
    assert!(
        deployment.contains("containerPort: 8443"),
        "the pod's ports"
    );
    assert!(
        read("deploy/container/Containerfile.collector").contains("EXPOSE 7443/tcp 8443/tcp"),
        "the image's ports"
    );
    let operator = read("docs/OPERATOR.md");
    let firewall = operator.split("## Ports and firewall").nth(1).unwrap();
    assert!(
        firewall.contains("8443/tcp"),
        "OPERATOR.md's firewall table"
    );
}

/// The value of the first `key=` line of a unit file.
fn directive<'a>(unit: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    unit.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
}

#[test]
fn the_systemd_units_are_hardened_valid_and_start_the_binaries_the_cli_way() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let verify = Command::new("systemd-analyze").arg("--version").output();
    let have_verify = verify.is_ok_and(|o| o.status.success());
    if !have_verify {
        sov_e2e::skipped(
            "deploy::the_systemd_units_are_hardened_valid_and_start_the_binaries_the_cli_way (systemd-analyze verify)",
            "systemd-analyze not found; deploy/systemd/*.service NOT verified by systemd",
        );
    }
    for (unit_name, side, installed, e2e, verb) in [
        (
            "sov-agent.service",
            Side::Agent,
            "/usr/local/bin/sov-agent",
            "e2e-agent",
            "run",
        ),
        (
            "sov-collector.service",
            Side::Collector,
            "/usr/local/bin/sov-collector",
            "e2e-collector",
            "serve",
        ),
    ] {
        let unit = read(&format!("deploy/systemd/{unit_name}"));
        for line in ["ProtectSystem=strict", "NoNewPrivileges=yes"] {
            assert!(unit.lines().any(|l| l == line), "{unit_name} lacks {line}");
        }

        // ExecStart: the installed binary, `run|serve --config FILE`; ExecStartPre: the same
        // plus --check-config.
        let start: Vec<&str> = directive(&unit, "ExecStart").split_whitespace().collect();
        let config = format!(
            "/etc/sovereign/{}",
            match side {
                Side::Agent => "agent.toml",
                Side::Collector => "collector.toml",
            }
        );
        assert_eq!(
            start,
            [installed, verb, "--config", config.as_str()],
            "{unit_name} ExecStart"
        );
        let pre: Vec<&str> = directive(&unit, "ExecStartPre")
            .split_whitespace()
            .collect();
        assert_eq!(pre[..start.len()], start[..], "{unit_name} ExecStartPre");
        assert_eq!(
            pre[start.len()..],
            ["--check-config"],
            "{unit_name} ExecStartPre"
        );

        // The CLI accepts exactly these arguments (the config path swapped for a real one).
        let example = match side {
            Side::Agent => read("deploy/agent.toml"),
            Side::Collector => read("deploy/collector.toml"),
        };
        let state = dir.path().join(format!("{unit_name}.state"));
        let cfg = dir.path().join(format!("{unit_name}.toml"));
        std::fs::write(&cfg, localise(&example, side, &pki, &state)).unwrap();
        let mut args: Vec<&str> = pre[1..].to_vec();
        args[2] = cfg.to_str().unwrap();
        let (code, _, err) = run(e2e, &args);
        assert_eq!(code, 0, "{e2e} {args:?}:\n{err}");

        if have_verify {
            // The real binary paths do not exist here: point them at the test binaries so that
            // verify checks everything else (it refuses a unit whose command is missing).
            let copy = dir.path().join(unit_name);
            std::fs::write(&copy, unit.replace(installed, &bin_path(e2e))).unwrap();
            let out = Command::new("systemd-analyze")
                .arg("verify")
                .arg(&copy)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // verify exits 0 on an unknown key or a bad value ("…, ignoring"): any line about
            // the unit file is a failure too.
            assert!(
                out.status.success() && !text.contains(unit_name),
                "systemd-analyze verify {unit_name}:\n{text}"
            );
        }
    }

    // The collector's dynamic user reads its TLS files through LoadCredential=: the sources are
    // the files deploy/collector.toml names.
    let unit = read("deploy/systemd/sov-collector.service");
    assert!(unit.lines().any(|l| l == "DynamicUser=yes"));
    for file in ["ca.pem", "collector.pem", "collector.key"] {
        let line = format!("LoadCredential={file}:/etc/sovereign/{file}");
        assert!(unit.lines().any(|l| l == line), "missing {line}");
        assert!(
            read("deploy/collector.toml").contains(&format!("\"/etc/sovereign/{file}\"")),
            "deploy/collector.toml does not name /etc/sovereign/{file}"
        );
    }
}

/// `deploy/gpu-check.sh` with `env`; its exit code and its output lines.
fn gpu_check(env: &[(&str, &str)]) -> (i32, Vec<String>) {
    let out = Command::new(repo().join("deploy/gpu-check.sh"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

fn executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The agent's view of one H100 running pid 4242 (in a pod) with `mem_mib` of GPU memory.
fn agent_json(pids: &[u32], mem_mib: u64) -> String {
    let procs: Vec<String> = pids
        .iter()
        .map(|p| {
            format!(
                r#"{{"pid":{p},"used_memory_bytes":{},"kind":"compute","container":{{"pod_name":"vllm-0","pod_namespace":"inference","id":"abc"}}}}"#,
                mem_mib << 20
            )
        })
        .collect();
    format!(
        r#"{{"gpu":{{"state":"ok","reason":"","driver_version":"550.54.15","devices":[{{"index":0,"uuid":"GPU-abc","pci_bus_id":"00000000:17:00.0","memory_total_bytes":{},"memory_used_bytes":{},"utilization_gpu_percent":85,"processes":[{}]}}]}}}}"#,
        81_559u64 << 20,
        30_000u64 << 20,
        procs.join(",")
    )
}

#[test]
fn the_gpu_check_script_prints_one_verdict_line_and_fails_clearly_without_a_gpu() {
    // This machine has no NVIDIA GPU: the real nvidia-smi is absent, and the real agent sees
    // none. nvidia-smi and, for the comparison itself, the agent's JSON are test doubles
    // standing in for the hardware; on a GPU machine the script runs against both real ones.
    let dir = tempfile::tempdir().unwrap();
    // Exactly as the README writes it: here, without an NVIDIA driver, it cannot compare.
    let (code, lines) = gpu_check(&[]);
    assert_eq!(lines.len(), 1, "one verdict line: {lines:?}");
    assert!(lines[0].starts_with("GPU-CHECK "), "{lines:?}");
    let have_smi = Command::new("nvidia-smi").arg("-L").output().is_ok();
    if !have_smi {
        assert_eq!(code, 2, "{lines:?}");
    }
    let (code, lines) = gpu_check(&[("NVIDIA_SMI", "/nonexistent/nvidia-smi")]);
    assert_eq!(code, 2, "{lines:?}");
    assert_eq!(lines.len(), 1, "one verdict line: {lines:?}");
    assert!(
        lines[0].starts_with("GPU-CHECK FAIL cannot compare: no nvidia-smi"),
        "{lines:?}"
    );

    let smi = dir.path().join("nvidia-smi");
    executable(
        &smi,
        "#!/bin/sh\ncase \"$1\" in\n\
         --query-gpu=*) echo '0, GPU-abc, NVIDIA H100 80GB HBM3, 00000000:17:00.0, 30010, 81559, 87, 40, 550.54.15' ;;\n\
         --query-compute-apps=*) echo 'GPU-abc, 4242, 29000, python3' ;;\n\
         *) exit 9 ;;\nesac\n",
    );
    let smi = smi.to_str().unwrap();
    let agent = bin_path("e2e-agent");
    let (code, lines) = gpu_check(&[("NVIDIA_SMI", smi), ("SOV_AGENT", &agent)]);
    assert_eq!(code, 1, "{lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("GPU-CHECK FAIL agent sees no GPU"),
        "{lines:?}"
    );

    let fake_agent = |name: &str, json: &str| {
        let json_path = dir.path().join(format!("{name}.json"));
        std::fs::write(&json_path, json).unwrap();
        let p = dir.path().join(name);
        executable(&p, &format!("#!/bin/sh\ncat '{}'\n", json_path.display()));
        p.to_string_lossy().into_owned()
    };
    let same = fake_agent("same", &agent_json(&[4242], 29_010));
    let (code, lines) = gpu_check(&[("NVIDIA_SMI", smi), ("SOV_AGENT", &same)]);
    assert_eq!((code, lines.len()), (0, 1), "{lines:?}");
    assert!(
        lines[0].starts_with("GPU-CHECK PASS devices=1 processes=1 in_containers=1"),
        "{lines:?}"
    );
    assert!(lines[0].contains("inference/vllm-0"), "{lines:?}");

    let wrong = fake_agent("wrong", &agent_json(&[777], 29_010));
    let (code, lines) = gpu_check(&[("NVIDIA_SMI", smi), ("SOV_AGENT", &wrong)]);
    assert_eq!((code, lines.len()), (1, 1), "{lines:?}");
    assert!(lines[0].contains("pid 4242 on GPU-abc"), "{lines:?}");
    assert!(lines[0].contains("pid 777"), "{lines:?}");
}
