//! The web page, driven by Debian's headless Chromium against a real collector over HTTPS:
//! each view shows its content, and the browser console stays empty. `.ci/run` installs
//! `chromium`; elsewhere the test skips loudly when the browser is missing, unless
//! `SOV_REQUIRE_CHROMIUM=1`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;

use sov_collector::auth::Role;
use sov_collector::breach::{Observation, Severity};
use sov_collector::config::GeoOverride;
use sov_e2e::{InProcessCollector, Pki, free_port, push_client};
use sov_proto::pb;

/// Longest one page load may take, seconds.
const PAGE_TIMEOUT_SECS: &str = "90";

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|b| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Load `url` headless; the DOM after the scripts ran, and the browser's log.
fn load(browser: &str, profile: &Path, url: &str) -> (String, String) {
    let out = Command::new("timeout")
        .args([
            PAGE_TIMEOUT_SECS,
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            // The collector's certificate comes from the test's own CA.
            "--ignore-certificate-errors",
            &format!("--user-data-dir={}", profile.display()),
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ])
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Console lines (messages, uncaught errors, failed loads) in the browser's log.
fn console_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(":CONSOLE")).collect()
}

async fn seed(pki: &Pki, url: &str, store: &dyn sov_collector::store::Store) {
    let at = sov_common::clock::now_unix_ms() - 600_000;
    let mut r = pb::Report {
        epoch: 1,
        seq: 1,
        observed_unix_ms: at,
        node_info: Some(pb::NodeInfo {
            node: "gpu-node-1".into(),
            site: "rabat-1".into(),
            country: "MA".into(),
            agent_version: "0.1.0".into(),
            ..Default::default()
        }),
        host: Some(pb::HostSample::default()),
        weight_inventory_full: true,
        ..Default::default()
    };
    r.gpus = vec![pb::GpuSample {
        uuid: "GPU-0".into(),
        processes: vec![pb::GpuProcess {
            pid: 100,
            gpu_seconds: 5400.0,
            ..Default::default()
        }],
        ..Default::default()
    }];
    r.weight_files = vec![pb::WeightFile {
        path: "/models/llama.safetensors".into(),
        format: pb::WeightFormat::Safetensors as i32,
        size_bytes: 16_000_000_000,
        sha256: "c".repeat(64),
        identity: Some(pb::ModelIdentity {
            model: "meta-llama/Llama-3.1-8B".into(),
            source: "hf-cache".into(),
            ..Default::default()
        }),
        users: vec![pb::WeightUser {
            pid: 100,
            process: "vllm".into(),
            mapped: true,
            ..Default::default()
        }],
        ..Default::default()
    }];
    r.flows = vec![pb::Flow {
        protocol: pb::Protocol::Tcp as i32,
        remote_address: "192.0.2.10".into(),
        remote_port: 443,
        pid: 100,
        bytes_sent: 7_000_000,
        bytes_received: 1000,
        direction: pb::Direction::Outbound as i32,
        connections: 1,
        start_unix_ms: at - 5000,
        end_unix_ms: at,
        ..Default::default()
    }];
    let mut c = push_client(&pki.client_tls(Role::Agent, "gpu-node-1"), url)
        .await
        .unwrap();
    c.push(r).await.unwrap();
    store
        .observe_breach(Observation {
            rule: "foreign-egress".into(),
            node: "gpu-node-1".into(),
            subject: "country:US".into(),
            severity: Severity::Critical,
            evidence: serde_json::json!({"bytes": 7_000_000}),
            at_unix_ms: at,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_view_of_the_web_page_shows_its_content_in_chromium_without_console_errors() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("SOV_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "chromium is required (SOV_REQUIRE_CHROMIUM=1) but not installed"
        );
        sov_e2e::skipped(
            "web (headless Chromium)",
            "chromium is not installed (apt-get install -y chromium); set SOV_REQUIRE_CHROMIUM=1 to fail instead",
        );
        return;
    };
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.geo.overrides = vec![GeoOverride {
            cidr: "192.0.2.0/24".into(),
            country: "US".into(),
            asn: Some(64500),
            org: Some("Example Cloud".into()),
            operator_country: None,
        }];
        c.http.listen = Some(format!("127.0.0.1:{http_port}").parse().unwrap());
    })
    .await;
    let store = sov_collector::store::open("", data.path()).await.unwrap();
    seed(&pki, &collector.url(), store.as_ref()).await;
    let now = sov_common::clock::now_unix_ms();
    let (token, rec) =
        sov_collector::token::generate(Role::Regulator, "browser", now, 3_600_000).unwrap();
    store.insert_token(rec).await.unwrap();
    let base = format!("https://localhost:{http_port}/");
    let profile = tempfile::tempdir().unwrap();

    // The overview needs a jurisdiction: this collector has no policy file, so the page is
    // asked with ?jurisdiction=... through the API's own parameter.
    let views: [(&str, &[&str]); 5] = [
        (
            "overview",
            &[
                "Who holds the weights",
                "GPU-hours",
                "How complete",
                "1 / 1 nodes reporting",
            ],
        ),
        ("egress", &["egress-table", "US", "7.0 MB"]),
        (
            "models",
            &[
                "meta-llama/Llama-3.1-8B",
                "gpu-node-1 (rabat-1, MA)",
                "16.0 GB",
            ],
        ),
        ("breaches", &["foreign-egress", "country:US", "critical"]),
        ("nodes", &["gpu-node-1", "rabat-1", "0.1.0"]),
    ];
    for (view, wanted) in views {
        let url = format!("{base}?view={view}&jurisdiction=MA#token={token}");
        let (dom, log) = tokio::task::block_in_place(|| load(browser, profile.path(), &url));
        assert!(
            dom.contains("data-state=\"ready\""),
            "view {view} did not finish loading:\n{dom}\n{log}"
        );
        for w in wanted {
            assert!(dom.contains(w), "view {view} lacks {w:?}:\n{dom}");
        }
        for external in ["src=\"http", "href=\"http", "src=\"//", "href=\"//"] {
            assert!(
                !dom.contains(external),
                "view {view} refers to an external asset"
            );
        }
        let console = console_lines(&log);
        assert!(
            console.is_empty(),
            "view {view}: console not empty: {console:#?}"
        );
    }

    // An agent's token gets the page, which says the role may not read.
    let (agent_token, rec) =
        sov_collector::token::generate(Role::Agent, "agent", now, 3_600_000).unwrap();
    store.insert_token(rec).await.unwrap();
    let url = format!("{base}?view=nodes#token={agent_token}");
    let (dom, _) = tokio::task::block_in_place(|| load(browser, profile.path(), &url));
    assert!(dom.contains("data-state=\"failed\""), "{dom}");
    assert!(dom.contains("Your role may not read this"), "{dom}");

    collector.stop().await;
}
