//! The regulators' console, driven by Debian's headless Chromium against a real collector over
//! HTTPS, fed by real reports over gRPC: every view and detail page (overview, map, egress,
//! models, model, breaches, breach, nodes, node, country) shows its content, links to the
//! model, node and country pages, keeps the one time range in every link, draws its charts and
//! the world map, shows local times with the exact UTC time on hover, and leaves the browser
//! console empty. A screenshot of every page is kept under `target/web-screenshots/` for a
//! person to look at; with `SOV_SCREENSHOTS_DIR=docs/screenshots` the README's four
//! (overview, map, breach, model) are written there too:
//!
//! ```sh
//! SOV_SCREENSHOTS_DIR=docs/screenshots cargo test -p sov-e2e --test web
//! ```
//!
//! `.ci/run` installs `chromium`; elsewhere the test skips loudly when the browser is missing,
//! unless `SOV_REQUIRE_CHROMIUM=1`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use sov_collector::auth::Role;
use sov_collector::breach::{Observation, Severity};
use sov_collector::config::GeoOverride;
use sov_e2e::{
    InProcessCollector, Pki, free_port, https_get, llama_weight_file, present_or_skip, push_client,
};
use sov_proto::pb;

/// Longest one page load may take, seconds.
const PAGE_TIMEOUT_SECS: &str = "90";
/// The pages the README shows, as `(view name in the test, file name)`.
const README_SHOTS: [(&str, &str); 4] = [
    ("overview", "console-overview.png"),
    ("map", "console-map.png"),
    ("breach", "console-breach.png"),
    ("model", "console-model.png"),
];

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|b| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Load `url` headless, taking a screenshot to `shot`; the DOM after the scripts ran, and the
/// browser's log.
fn load(browser: &str, profile: &Path, url: &str, shot: &Path) -> (String, String) {
    let out = Command::new("timeout")
        .args([
            PAGE_TIMEOUT_SECS,
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            // The collector's certificate comes from the test's own CA.
            "--ignore-certificate-errors",
            &format!("--user-data-dir={}", profile.display()),
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,1100",
            "--virtual-time-budget=20000",
            &format!("--screenshot={}", shot.display()),
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

/// Six reports of one node over the last day: GPU time, a model held by a process, and
/// traffic to three foreign countries and one inside, as an agent would push them.
async fn seed(pki: &Pki, url: &str, store: &dyn sov_collector::store::Store) {
    let now = sov_common::clock::now_unix_ms();
    let mut c = push_client(&pki.client_tls(Role::Agent, "gpu-node-1"), url)
        .await
        .unwrap();
    for seq in 1..=6u64 {
        let at = now - 3_600_000 * (19 - 3 * seq as i64);
        let flow = |addr: &str, bytes: u64| pb::Flow {
            protocol: pb::Protocol::Tcp as i32,
            remote_address: addr.into(),
            remote_port: 443,
            pid: 100,
            bytes_sent: bytes,
            bytes_received: 1000,
            direction: pb::Direction::Outbound as i32,
            connections: 1,
            start_unix_ms: at - 5000,
            end_unix_ms: at,
            ..Default::default()
        };
        let r = pb::Report {
            epoch: 1,
            seq,
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
            processes: vec![pb::ProcessInfo {
                pid: 100,
                name: "vllm".into(),
                ..Default::default()
            }],
            gpus: vec![pb::GpuSample {
                uuid: "GPU-0".into(),
                processes: vec![pb::GpuProcess {
                    pid: 100,
                    gpu_seconds: 900.0 * seq as f64,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            weight_files: vec![llama_weight_file()],
            training_runs: vec![pb::TrainingRun {
                run_id: "100-7-web".into(),
                pid: 100,
                process: "vllm".into(),
                start_unix_ms: at - 60_000,
                last_activity_unix_ms: at,
                gpu_seconds: 900.0 * seq as f64,
                inputs: vec![
                    pb::TrainingInput {
                        kind: "base-weights".into(),
                        model: "meta-llama/Llama-3.1-8B".into(),
                        path: "/models/llama.safetensors".into(),
                        ..Default::default()
                    },
                    pb::TrainingInput {
                        kind: "dataset".into(),
                        path: "/data/darija.parquet".into(),
                        format: "parquet".into(),
                        ..Default::default()
                    },
                ],
                outputs: vec![pb::TrainingOutput {
                    path: "/out/ckpt-1.safetensors".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            flows: vec![
                flow("192.0.2.10", 1_000_000 * seq + 1_000_000),
                flow("198.51.100.7", 400_000 * seq),
                flow("203.0.113.9", 150_000),
                flow("10.1.2.3", 2_000_000),
            ],
            ..Default::default()
        };
        c.push(r).await.unwrap();
    }
    store
        .observe_breach(Observation {
            rule: "foreign-egress".into(),
            node: "gpu-node-1".into(),
            subject: "country:US".into(),
            severity: Severity::Critical,
            evidence: serde_json::json!({"country": "US", "counters": {"bytes": 7_000_000}}),
            at_unix_ms: now - 60_000,
        })
        .await
        .unwrap();
}

fn place(cidr: &str, country: &str, org: &str) -> GeoOverride {
    GeoOverride {
        cidr: cidr.into(),
        country: country.into(),
        asn: Some(64500),
        org: Some(org.into()),
        operator_country: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_of_the_console_shows_its_content_links_and_charts_in_chromium_without_console_errors()
 {
    let browser = chromium();
    if !present_or_skip(
        browser.is_some(),
        "SOV_REQUIRE_CHROMIUM",
        "web (headless Chromium)",
        "chromium is not installed (apt-get install -y chromium)",
    ) {
        return;
    }
    let browser = browser.unwrap();
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let policy = data.path().join("policy.toml");
    std::fs::write(
        &policy,
        "jurisdiction = \"MA\"\n[[model]]\nmatch = \"meta-llama/*\"\nclass = \"restricted\"\n",
    )
    .unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.policy = Some(policy);
        c.geo.overrides = vec![
            place("192.0.2.0/24", "US", "Example Cloud"),
            place("198.51.100.0/24", "FR", "Exemple Hébergement"),
            place("203.0.113.0/24", "DE", "Beispiel Rechenzentrum"),
            place("10.0.0.0/8", "MA", "Rabat campus"),
        ];
        c.http.listen = Some(format!("127.0.0.1:{http_port}").parse().unwrap());
    })
    .await;
    let store = sov_collector::store::open("", data.path()).await.unwrap();
    seed(&pki, &collector.url(), store.as_ref()).await;
    let now = sov_common::clock::now_unix_ms();
    let (token, rec) =
        sov_collector::token::generate(Role::Regulator, "browser", now, 3_600_000).unwrap();
    store.insert_token(rec).await.unwrap();
    let addr = collector.config.http.listen.unwrap();
    let breach_id = https_get(&pki, addr, None, Some(&token), "/api/v1/breaches")
        .await
        .unwrap()
        .json()["breaches"][0]["breach_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let base = format!("https://localhost:{http_port}/");
    let profile = tempfile::tempdir().unwrap();
    let shots = repo().join("target/web-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let readme_dir = std::env::var("SOV_SCREENSHOTS_DIR")
        .ok()
        .map(|d| repo().join(d));

    // The policy file makes MA the jurisdiction and Llama restricted; the console is also
    // asked with ?jurisdiction=MA (kept in every link, like the time range of the last 7 days).
    let sha = "c".repeat(64);
    let pages: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "overview",
            String::new(),
            vec![
                "Who holds the weights",
                "1 / 1 nodes reporting",
                "Open breaches by severity",
                "id=\"chart-egress\"",
                "id=\"chart-gpu\"",
                "id=\"chart-reports\"",
                "<rect",
                "id=\"world-map\"",
                "data-country=\"US\"",
                "foreign",
                "last 7 days",
            ],
        ),
        (
            "map",
            "view=map".into(),
            vec![
                "id=\"world-map\"",
                "data-country=\"MA\"",
                "data-country=\"FR\"",
                "egress-table",
            ],
        ),
        (
            "egress",
            "view=egress".into(),
            vec![
                "egress-table",
                "US",
                "FR",
                "DE",
                "foreign",
                "inside",
                "process-table",
                "vllm",
            ],
        ),
        (
            "models",
            "view=models".into(),
            vec![
                "meta-llama/Llama-3.1-8B",
                "cccccccccccc…",
                "16.0 GB",
                ">restricted</span>",
            ],
        ),
        (
            "training",
            "view=training".into(),
            vec![
                "training-table",
                "meta-llama/Llama-3.1-8B",
                "parquet:/data/darija.parquet",
            ],
        ),
        (
            "model",
            format!("view=model&q={sha}"),
            vec![
                "copies-table",
                "users-table",
                "vllm",
                "/models/llama.safetensors",
                &sha,
            ],
        ),
        (
            "breaches",
            "view=breaches".into(),
            vec!["breaches-table", "foreign-egress", "country:US", "critical"],
        ),
        (
            "breach",
            format!("view=breach&id={breach_id}"),
            vec![
                "Breach foreign-egress on gpu-node-1",
                "id=\"evidence\"",
                "records-table",
                "The chain verifies",
                "export-evidence",
                "7000000",
            ],
        ),
        (
            "nodes",
            "view=nodes".into(),
            vec!["nodes-table", "gpu-node-1", "rabat-1", "0.1.0"],
        ),
        (
            "node",
            "view=node&name=gpu-node-1".into(),
            vec![
                "Node gpu-node-1",
                "node-facts",
                "process-table",
                "node-models",
                "meta-llama/Llama-3.1-8B",
            ],
        ),
        (
            "country",
            "view=country&code=US".into(),
            vec![
                "Country US (foreign)",
                "country-nodes",
                "gpu-node-1",
                "country-destinations",
                "192.0.2.10",
            ],
        ),
    ];
    for (name, query, wanted) in &pages {
        let sep = if query.is_empty() { "" } else { "&" };
        let url = format!("{base}?{query}{sep}range=7d&jurisdiction=MA#token={token}");
        let shot = shots.join(format!("{name}.png"));
        let (dom, log) = tokio::task::block_in_place(|| load(browser, profile.path(), &url, &shot));
        assert!(
            dom.contains("data-state=\"ready\""),
            "page {name} did not finish loading:\n{dom}\n{log}"
        );
        for w in wanted {
            assert!(dom.contains(w), "page {name} lacks {w:?}:\n{dom}");
        }
        // One time range: selected in the picker and kept in every link of the page.
        assert!(
            dom.contains("<option value=\"7d\" selected=\"\">"),
            "page {name}: the range picker"
        );
        for href in dom.split("href=\"?").skip(1) {
            let href = href.split('"').next().unwrap();
            assert!(
                href.contains("range=7d") && href.contains("jurisdiction=MA"),
                "page {name}: a link that loses the time range: ?{href}"
            );
        }
        // Local times, the exact UTC time on hover.
        if ["breaches", "breach", "nodes", "model"].contains(name) {
            assert!(
                dom.contains("<time datetime=") && dom.contains("title=\"UTC 20"),
                "page {name}: times without their UTC"
            );
        }
        for external in ["src=\"http", "href=\"http", "src=\"//", "href=\"//"] {
            assert!(
                !dom.contains(external),
                "page {name} refers to an external asset"
            );
        }
        let console = console_lines(&log);
        assert!(
            console.is_empty(),
            "page {name}: console not empty: {console:#?}"
        );
        let png = std::fs::read(&shot).unwrap_or_default();
        assert!(
            png.starts_with(b"\x89PNG"),
            "page {name}: no screenshot at {}",
            shot.display()
        );
        if let Some(dir) = &readme_dir
            && let Some((_, file)) = README_SHOTS.iter().find(|(v, _)| v == name)
        {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::copy(&shot, dir.join(file)).unwrap();
        }
    }

    // Every kind of page is linked from the tables: model, node, country and breach pages.
    let (dom, _) = tokio::task::block_in_place(|| {
        load(
            browser,
            profile.path(),
            &format!("{base}?view=models&range=7d&jurisdiction=MA#token={token}"),
            &shots.join("links.png"),
        )
    });
    for target in [
        format!("view=model&amp;range=7d&amp;jurisdiction=MA&amp;q={sha}"),
        "view=node&amp;range=7d&amp;jurisdiction=MA&amp;name=gpu-node-1".into(),
        "view=country&amp;range=7d&amp;jurisdiction=MA&amp;code=MA".into(),
    ] {
        assert!(
            dom.contains(&target),
            "models page lacks a link to {target}:\n{dom}"
        );
    }

    // Without a credential the page says so (and does not claim a sign-in).
    let (dom, _) = tokio::task::block_in_place(|| {
        load(
            browser,
            profile.path(),
            &format!("{base}?view=nodes"),
            &shots.join("anonymous.png"),
        )
    });
    assert!(dom.contains("data-state=\"failed\""), "{dom}");
    assert!(dom.contains("Not signed in"), "{dom}");
    assert!(
        dom.contains("<span id=\"whoami\">not signed in</span>"),
        "{dom}"
    );

    // An agent's token gets the page, which says the role may not read.
    let (agent_token, rec) =
        sov_collector::token::generate(Role::Agent, "agent", now, 3_600_000).unwrap();
    store.insert_token(rec).await.unwrap();
    let url = format!("{base}?view=nodes#token={agent_token}");
    let (dom, _) = tokio::task::block_in_place(|| {
        load(browser, profile.path(), &url, &shots.join("agent.png"))
    });
    assert!(dom.contains("data-state=\"failed\""), "{dom}");
    assert!(dom.contains("Your role may not read this"), "{dom}");

    collector.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_shapes_are_served_without_credentials_and_name_every_country() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.http.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    })
    .await;
    let addr = collector.config.http.listen.unwrap();
    let topo = sov_e2e::eventually(
        std::time::Duration::from_secs(30),
        "the https listener",
        || async {
            https_get(&pki, addr, None, None, "/assets/geo/countries-110m.json")
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(topo.status, 200);
    let geometries = topo.json()["objects"]["countries"]["geometries"]
        .as_array()
        .unwrap()
        .len();
    assert!(geometries > 170, "{geometries} countries");
    let csv = https_get(&pki, addr, None, None, "/assets/geo/iso3166.csv")
        .await
        .unwrap();
    assert_eq!(csv.status, 200);
    assert!(csv.body.contains("504,MA,Morocco"), "{}", &csv.body[..200]);
    collector.stop().await;
}
