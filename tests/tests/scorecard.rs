//! The sovereignty scorecard against a scripted scenario with known answers: two nodes inside
//! the jurisdiction (MA) and one outside (FR), known GPU-seconds, known weights and known
//! bytes to destinations placed by CIDR overrides; read with `sovctl scorecard --output json`
//! and over HTTPS, both must give the same numbers. Then a signed evidence report of the same
//! range is exported (JSON and HTML), verified offline, altered by one byte and refused.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use serde_json::Value;
use sov_collector::auth::Role;
use sov_collector::config::GeoOverride;
use sov_e2e::{InProcessCollector, Pki, free_port, https_get, push_client};
use sov_proto::pb;

const US: &str = "192.0.2.10";
const FR: &str = "198.51.100.7";
const MA: &str = "203.0.113.5";

fn overrides() -> Vec<GeoOverride> {
    let o = |cidr: &str, country: &str, asn: u32, org: &str| GeoOverride {
        cidr: cidr.into(),
        country: country.into(),
        asn: Some(asn),
        org: Some(org.into()),
        operator_country: None,
    };
    vec![
        o("192.0.2.0/24", "US", 64500, "Example Cloud"),
        o("198.51.100.0/24", "FR", 64501, "Example FR"),
        o("203.0.113.0/24", "MA", 64502, "Example MA"),
    ]
}

/// One process on one GPU charged `gpu_seconds`.
fn gpu(pid: u32, gpu_seconds: f64) -> pb::GpuSample {
    pb::GpuSample {
        index: 0,
        uuid: format!("GPU-{pid}"),
        name: "NVIDIA H100".into(),
        processes: vec![pb::GpuProcess {
            pid,
            gpu_seconds,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn weight(path: &str, model: &str, sha: &str, users: &[(u32, &str)]) -> pb::WeightFile {
    pb::WeightFile {
        path: path.into(),
        format: pb::WeightFormat::Safetensors as i32,
        size_bytes: 1000,
        mtime_unix_ms: 5,
        sha256: sha.into(),
        identity: Some(pb::ModelIdentity {
            model: model.into(),
            source: "hf-cache".into(),
            ..Default::default()
        }),
        storage: Some(pb::StorageLocation {
            fs_type: "ext4".into(),
            ..Default::default()
        }),
        users: users
            .iter()
            .map(|(pid, process)| pb::WeightUser {
                pid: *pid,
                process: (*process).into(),
                mapped: true,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn flow(pid: u32, remote: &str, sent: u64, at: i64) -> pb::Flow {
    pb::Flow {
        protocol: pb::Protocol::Tcp as i32,
        remote_address: remote.into(),
        remote_port: 443,
        pid,
        bytes_sent: sent,
        bytes_received: 10,
        direction: pb::Direction::Outbound as i32,
        connections: 1,
        start_unix_ms: at - 5_000,
        end_unix_ms: at,
        ..Default::default()
    }
}

/// A report of `node` in `country` at `at`.
fn report(node: &str, country: &str, seq: u64, at: i64) -> pb::Report {
    pb::Report {
        epoch: 1,
        seq,
        observed_unix_ms: at,
        node_info: Some(pb::NodeInfo {
            node: node.into(),
            site: format!("{}-dc", country.to_lowercase()),
            country: country.into(),
            ..Default::default()
        }),
        host: Some(pb::HostSample::default()),
        ..Default::default()
    }
}

async fn push(pki: &Pki, url: &str, r: pb::Report) {
    let node = r.node_info.as_ref().unwrap().node.clone();
    let mut c = push_client(&pki.client_tls(Role::Agent, &node), url)
        .await
        .unwrap();
    c.push(r).await.unwrap();
}

fn close(v: &Value, want: f64) -> bool {
    v.as_f64().is_some_and(|x| (x - want).abs() < 1e-3)
}

fn find<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|x| x[key] == value)
        .unwrap_or_else(|| panic!("no {key} = {value} in {list}"))
}

fn check(card: &Value) {
    assert_eq!(card["jurisdiction"], "MA");
    // Who holds the weights: Llama (US) on ma-1 and fr-1, Mistral (FR) on ma-2.
    let w = &card["weights"];
    assert_eq!(w["models"], 2, "{w}");
    assert_eq!(w["copies"], 3);
    assert_eq!(w["copies_inside"], 2);
    assert_eq!(w["copies_outside"], 1);
    let us = find(&w["by_origin"], "origin", "US");
    assert_eq!(
        (us["copies"].as_u64(), us["copies_outside"].as_u64()),
        (Some(2), Some(1))
    );
    let fr = find(&w["by_origin"], "origin", "FR");
    assert_eq!(
        (fr["copies"].as_u64(), fr["copies_inside"].as_u64()),
        (Some(1), Some(1))
    );
    // Where AI runs: 3600 s on ma-1 (Llama), 1800 s on ma-2 (no weights), 7200 s on fr-1 (Llama).
    let c = &card["compute"];
    assert!(close(&c["gpu_hours"], 3.5), "{c}");
    assert!(close(&c["gpu_hours_inside"], 1.5), "{c}");
    assert!(close(&c["gpu_hours_outside"], 2.0), "{c}");
    assert!(close(
        &find(&c["by_jurisdiction"], "country", "FR")["gpu_hours"],
        2.0
    ));
    assert!(close(
        &find(&c["by_jurisdiction"], "country", "MA")["gpu_hours"],
        1.5
    ));
    assert!(close(
        &find(&c["by_model_origin"], "origin", "US")["gpu_hours"],
        3.0
    ));
    assert!(close(
        &find(&c["by_model_origin"], "origin", "unattributed")["gpu_hours"],
        0.5
    ));
    // Where data flows, from the inside nodes: 6000 to US, 2000 to MA, 1000 to FR (fr-1's
    // 50,000 bytes to the US are not the jurisdiction's data leaving).
    let d = &card["data"];
    assert_eq!(d["bytes_sent"], 9000, "{d}");
    assert_eq!(d["bytes_sent_outside"], 7000);
    assert!(close(&d["share_leaving"], 0.7778), "{d}");
    assert_eq!(find(&d["by_country"], "country", "US")["bytes_sent"], 6000);
    assert_eq!(find(&d["by_country"], "country", "MA")["bytes_sent"], 2000);
    assert_eq!(find(&d["by_country"], "country", "FR")["bytes_sent"], 1000);
    let top = &d["by_asn_all_nodes"][0];
    assert_eq!(
        (top["asn"].as_u64(), top["bytes_sent"].as_u64()),
        (Some(64500), Some(56_000))
    );
    // How complete: three nodes reporting; ma-2 skipped sequence number 2.
    let p = &card["completeness"];
    assert_eq!(p["nodes"], 3, "{p}");
    assert_eq!(p["nodes_reporting"], 3);
    assert_eq!(p["missing_reports"], 1);
    assert_eq!(p["nodes_with_missing_reports"][0]["node"], "ma-2");
    assert_eq!(
        p["nodes_with_missing_reports"][0]["ranges"],
        serde_json::json!([[2, 2]])
    );
    assert_eq!(p["silent_nodes"].as_array().unwrap().len(), 0);
}

// sovctl runs as a child process while this test waits for it: the collector needs a thread of
// its own meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scorecard_gives_the_known_answers_of_a_scripted_scenario() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let policy = data.path().join("policy.toml");
    std::fs::write(&policy, "jurisdiction = \"MA\"\n").unwrap();
    let http_port = free_port();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.geo.overrides = overrides();
        c.policy = Some(policy.clone());
        c.http.listen = Some(format!("127.0.0.1:{http_port}").parse().unwrap());
    })
    .await;
    let url = collector.url();
    let at = sov_common::clock::now_unix_ms() - 600_000;

    let mut r = report("ma-1", "MA", 1, at);
    r.gpus = vec![gpu(100, 3600.0)];
    r.weight_inventory_full = true;
    r.weight_files = vec![weight(
        "/models/llama.safetensors",
        "meta-llama/Llama-3.1-8B",
        &"a".repeat(64),
        &[(100, "vllm")],
    )];
    r.flows = vec![flow(100, US, 6000, at), flow(100, MA, 2000, at)];
    push(&pki, &url, r).await;

    let mut r = report("ma-2", "MA", 1, at);
    r.gpus = vec![gpu(200, 1800.0)];
    r.weight_inventory_full = true;
    r.weight_files = vec![weight(
        "/models/mistral.safetensors",
        "mistralai/Mistral-7B",
        &"b".repeat(64),
        &[],
    )];
    r.flows = vec![flow(200, FR, 1000, at)];
    push(&pki, &url, r).await;
    // Sequence number 2 of ma-2 never arrives.
    push(&pki, &url, report("ma-2", "MA", 3, at + 1000)).await;

    let mut r = report("fr-1", "FR", 1, at);
    r.gpus = vec![gpu(300, 7200.0)];
    r.weight_inventory_full = true;
    r.weight_files = vec![weight(
        "/srv/llama.safetensors",
        "meta-llama/Llama-3.1-8B",
        &"a".repeat(64),
        &[(300, "vllm")],
    )];
    r.flows = vec![flow(300, US, 50_000, at)];
    push(&pki, &url, r).await;

    // sovctl, the regulators' command line.
    let reg = pki.client(Role::Regulator, "analyst");
    let out = std::process::Command::new(sov_e2e::bin_path("e2e-sovctl"))
        .args([
            "--collector",
            &url,
            "--ca",
            pki.ca.to_str().unwrap(),
            "--cert",
            reg.cert.to_str().unwrap(),
            "--key",
            reg.key.to_str().unwrap(),
            "scorecard",
            "--since",
            "1h",
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let card: Value = serde_json::from_slice(&out.stdout).unwrap();
    check(&card);

    // The same over HTTPS.
    let reply = https_get(
        &pki,
        collector.config.http.listen.unwrap(),
        Some(&reg),
        None,
        "/api/v1/scorecard?since=1h",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    check(&reply.json());

    // The table form names the four questions.
    let out = std::process::Command::new(sov_e2e::bin_path("e2e-sovctl"))
        .args([
            "--collector",
            &url,
            "--ca",
            pki.ca.to_str().unwrap(),
            "--cert",
            reg.cert.to_str().unwrap(),
            "--key",
            reg.key.to_str().unwrap(),
            "scorecard",
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    for q in [
        "who holds the weights",
        "where AI runs",
        "where data flows",
        "how complete",
    ] {
        assert!(table.contains(q), "{table}");
    }

    // A signed evidence report of the same range: exported, verified offline, then altered by
    // one byte and refused.
    let store = sov_collector::store::open("", data.path()).await.unwrap();
    store
        .observe_breach(sov_collector::breach::Observation {
            rule: "foreign-egress".into(),
            node: "ma-1".into(),
            subject: "country:US".into(),
            severity: sov_collector::breach::Severity::Critical,
            evidence: serde_json::json!({"bytes": 6000}),
            at_unix_ms: at,
        })
        .await
        .unwrap();
    let sovctl = |args: &[&str]| {
        let mut all = vec![
            "--collector",
            &url,
            "--ca",
            pki.ca.to_str().unwrap(),
            "--cert",
            reg.cert.to_str().unwrap(),
            "--key",
            reg.key.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        std::process::Command::new(sov_e2e::bin_path("e2e-sovctl"))
            .args(&all)
            .output()
            .unwrap()
    };
    for format in ["json", "html"] {
        let file = data.path().join(format!("report.{format}"));
        let out = sovctl(&[
            "report",
            "--since",
            "1h",
            "--format",
            format,
            "--out",
            file.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("foreign-egress"), "{text}");
        assert!(text.contains("\"jurisdiction\":\"MA\""), "{format}");
        let out = sovctl(&["verify", file.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{format}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("report verified"), "{stdout}");
        assert!(stdout.contains("records intact"), "{stdout}");
        // One byte: a digit of the data leaving, in the signed numbers.
        let key = "\"bytes_sent_outside\":";
        let pos = text.find(&format!("{key}7000")).unwrap() + key.len();
        let mut bytes = text.into_bytes();
        bytes[pos] = b'1';
        std::fs::write(&file, &bytes).unwrap();
        let out = sovctl(&["verify", file.to_str().unwrap()]);
        assert!(
            !out.status.success(),
            "an altered {format} report must not verify"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    collector.stop().await;
}
