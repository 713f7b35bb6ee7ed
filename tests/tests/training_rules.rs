//! The two training rules end to end, like the other rules in `breach_rules.rs`: real agents
//! in this process, real files the test writes (Hugging Face cache safetensors, Parquet
//! datasets, a PEFT adapter directory), real trainer processes (python3 mapping a base, reading
//! a dataset, writing safetensors checkpoints), a real collector with a policy and a real
//! webhook receiver on loopback.
//!
//! - node-paris declares MA but the policy puts its site in France (outside). On it:
//!   - P1 maps the restricted base `acme/base-a` and reads an unclassified dataset
//!     (`training-offshore`, by its base); its checkpoints, derived from that base, reside there
//!     (`restricted-derivative`, lineage observed);
//!   - P2 maps the public base `open/base-b` and reads `census-2024.parquet`, restricted by a
//!     `name:` rule (`training-offshore`, by its dataset);
//!   - P3 the same base, reading a dataset restricted by its sha256 (`sha256:` rule: the agent
//!     fingerprints dataset files);
//!   - P4 the same base and the unclassified dataset: no breach;
//!   - a LoRA adapter whose `adapter_config.json` names `acme/base-a` (`restricted-derivative`,
//!     lineage declared);
//! - node-rabat (inside): R1 maps the restricted `acme/base-c` and reads the census: no breach,
//!   and its checkpoints are no breach either.
//!
//! Then the trainers P1–P3 stop: their `training-offshore` breaches resolve (the agent reports
//! the runs ended) while the derivatives, still on disk, stay open; then the checkpoints and the
//! adapter are removed and `restricted-derivative` resolves. The webhook gets each state change
//! once, in the breach log's order: open first, resolved last.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sov_collector::auth::Role;
use sov_collector::config::WebhookSinkConfig;
use sov_e2e::receivers::{HttpRequest, http_receiver};
use sov_e2e::training::{Trainer, TrainerPlan, parquet};
use sov_e2e::{InProcessCollector, Pki, agent_config, eventually};
use sov_proto::pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The policy; `INTERVIEWS` is replaced by the sha256 of the interviews dataset.
const POLICY: &str = r#"
jurisdiction = "MA"

[[site]]
name = "rabat"
country = "MA"

[[site]]
name = "paris"
country = "FR"

[[model]]
match = "acme/*"
class = "restricted"

[[model]]
match = "open/*"
class = "public"

[[dataset]]
match = "name:census-*.parquet"
class = "restricted"

[[dataset]]
match = "sha256:INTERVIEWS"
class = "restricted"

[thresholds]
window_secs = 10
silence_secs = 30
quiet_secs = 3
"#;

type Query = pb::query_client::QueryClient<tonic::transport::Channel>;

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A small real safetensors file.
fn safetensors_bytes(seed: u8) -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let a: Vec<u8> = (0..4096u32).map(|i| (i as u8).wrapping_add(seed)).collect();
    safetensors::serialize(
        [(
            "embed.weight",
            TensorView::new(Dtype::F32, vec![32, 32], &a).unwrap(),
        )],
        None,
    )
    .unwrap()
}

/// `org/name` as one safetensors file in a Hugging Face cache under `hub`.
fn hf_model(hub: &Path, org: &str, name: &str, seed: u8) -> PathBuf {
    sov_e2e::hf_cache_model(
        hub,
        org,
        name,
        &format!("{seed:0>64}"),
        &safetensors_bytes(seed),
    )
}

/// Two checkpoints of 64 Ki values, each written over 1.2 s, then idle (mapping, holding).
const PLAN: TrainerPlan = TrainerPlan {
    values: 65_536,
    count: 2,
    period_secs: 1.5,
    spread_secs: 1.2,
};

fn trainer(base: &Path, dataset: &Path, out: &Path) -> Trainer {
    Trainer::start(base, dataset, out, PLAN)
}

fn start_agent(
    cfg: sov_agent::config::AgentConfig,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let agent = sov_agent::Agent::open(cfg).unwrap();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        agent.run(s).await.unwrap();
    });
    (stop, task)
}

async fn breaches(q: &Query) -> Vec<pb::BreachSummary> {
    q.clone()
        .list_breaches(pb::ListBreachesRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .breaches
}

async fn runs(q: &Query) -> Vec<pb::TrainingRunSummary> {
    q.clone()
        .list_training(pb::ListTrainingRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs
}

fn evidence(b: &pb::BreachSummary) -> Value {
    serde_json::from_str(&b.evidence_json).unwrap()
}

/// The breach of `training-offshore` for the run of process `pid` on `node`.
fn offshore<'a>(
    all: &'a [pb::BreachSummary],
    node: &str,
    pid: u32,
) -> Option<&'a pb::BreachSummary> {
    all.iter().find(|b| {
        b.rule == "training-offshore"
            && b.node == node
            && b.subject.starts_with(&format!("run:{pid}-"))
    })
}

/// The `restricted-derivative` breaches on `node` of fingerprinted models (subject
/// `sha256:…`; a model seen before its hash is known opens one under `model:…`, which resolves
/// once the hash names it) whose restricted base is known from `source` ("training-run" or
/// "adapter-config").
fn derivatives<'a>(
    all: &'a [pb::BreachSummary],
    node: &str,
    source: &str,
) -> Vec<&'a pb::BreachSummary> {
    all.iter()
        .filter(|b| {
            b.rule == "restricted-derivative"
                && b.node == node
                && b.subject.starts_with("sha256:")
                && evidence(b)["restricted_bases"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|x| x["source"] == source))
        })
        .collect()
}

fn drain<T>(rx: &mut mpsc::Receiver<T>, into: &mut Vec<T>) {
    while let Ok(x) = rx.try_recv() {
        into.push(x);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn training_offshore_and_restricted_derivative_open_and_resolve_end_to_end() {
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path();
    // Weights: each node's own Hugging Face cache.
    let paris_hub = t.join("paris/hub");
    let rabat_hub = t.join("rabat/hub");
    let base_a = hf_model(&paris_hub, "acme", "base-a", 1);
    let base_b = hf_model(&paris_hub, "open", "base-b", 2);
    let base_c = hf_model(&rabat_hub, "acme", "base-c", 3);
    // A LoRA adapter on node-paris whose config names the restricted base.
    let adapter = paris_hub.join("team-lora");
    write(
        &adapter.join("adapter_config.json"),
        br#"{"base_model_name_or_path": "acme/base-a", "peft_type": "LORA", "r": 8}"#,
    );
    write(
        &adapter.join("adapter_model.safetensors"),
        &safetensors_bytes(9),
    );
    // Datasets: real Parquet files above the agent's 1 MiB floor, different content each.
    let open_web = t.join("data/open-web.parquet");
    let census = t.join("data/census-2024.parquet");
    let interviews = t.join("data/interviews.parquet");
    for (path, rows) in [
        (&open_web, 140_000),
        (&census, 150_000),
        (&interviews, 160_000),
    ] {
        write(path, &parquet(rows));
    }
    let interviews_sha = sov_e2e::sha256sum(&interviews);
    assert_eq!(interviews_sha.len(), 64);

    let (hook_url, mut hook) = http_receiver(200).await;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY.replace("INTERVIEWS", &interviews_sha)).unwrap();
    let data = dir.path().join("data");
    let p = policy.clone();
    let collector = InProcessCollector::start(&pki, &data, move |c| {
        c.policy = Some(p);
        c.alert.webhook = vec![WebhookSinkConfig {
            url: hook_url,
            secret: Some("s3cret".to_owned()),
            ..Default::default()
        }];
        c.alert.retry_max_secs = Some(3);
    })
    .await;
    let url = collector.url();

    let spools = tempfile::tempdir().unwrap();
    let agent = |name: &str, site: &str, hub: &Path| {
        let mut cfg = agent_config(&pki, name, vec![url.clone()], &spools.path().join(name));
        cfg.node.site = site.to_owned();
        cfg.weights = sov_e2e::weights_of_roots_only(vec![hub.to_owned()]);
        cfg.training.sample_interval_ms = 100;
        cfg
    };
    // node-paris declares MA; the policy's site list puts it in France.
    let (paris_stop, paris) = start_agent(agent("node-paris", "paris", &paris_hub));
    let (rabat_stop, rabat) = start_agent(agent("node-rabat", "rabat", &rabat_hub));

    // Each trainer has written its first checkpoint when this returns.
    let runs_dir = t.join("runs");
    let (p1, p2, p3, p4, r1) = tokio::task::block_in_place(|| {
        let mut all = (
            trainer(&base_a, &open_web, &runs_dir.join("p1")),
            trainer(&base_b, &census, &runs_dir.join("p2")),
            trainer(&base_b, &interviews, &runs_dir.join("p3")),
            trainer(&base_b, &open_web, &runs_dir.join("p4")),
            trainer(&base_c, &census, &runs_dir.join("r1")),
        );
        for tr in [&mut all.0, &mut all.1, &mut all.2, &mut all.3, &mut all.4] {
            assert_eq!(tr.next_line().unwrap().split(' ').next(), Some("wrote"));
        }
        all
    });
    let (pid1, pid2, pid3, pid4, rpid) = (p1.pid(), p2.pid(), p3.pid(), p4.pid(), r1.pid());

    let tls = pki.client_tls(Role::Regulator, "analyst");
    let q: Query = pb::query_client::QueryClient::new(tls.connect(&url).await.unwrap());

    // Everything opens: three runs outside reading something restricted, P1's two
    // checkpoints and the adapter as derivatives of a restricted base.
    let opened = eventually(
        Duration::from_secs(90),
        "training-offshore for P1-P3 and restricted-derivative for P1's checkpoints and the adapter",
        || {
            let q = q.clone();
            async move {
                let all = breaches(&q).await;
                let open = |b: Option<&pb::BreachSummary>| b.is_some_and(|b| b.state == "open");
                let ok = open(offshore(&all, "node-paris", pid1))
                    && open(offshore(&all, "node-paris", pid2))
                    && open(offshore(&all, "node-paris", pid3))
                    && derivatives(&all, "node-paris", "training-run").len() >= 2
                    && !derivatives(&all, "node-paris", "adapter-config").is_empty();
                ok.then_some(all)
            }
        },
    )
    .await;

    // P1: by its base; the evidence names the base, the run's process and its datasets.
    let b1 = offshore(&opened, "node-paris", pid1).unwrap();
    assert_eq!(b1.severity, "critical");
    let ev = evidence(b1);
    assert_eq!(ev["node_country"], "FR");
    assert_eq!(ev["pid"], pid1);
    assert_eq!(ev["process"], "python3");
    let r = &ev["restricted_inputs"][0];
    assert_eq!(
        (r["kind"].as_str(), r["model"].as_str(), r["rule"].as_str()),
        (Some("base-weights"), Some("acme/base-a"), Some("model[0]")),
        "{ev:#}"
    );
    assert_eq!(
        ev["restricted_inputs"].as_array().unwrap().len(),
        1,
        "{ev:#}"
    );
    assert_eq!(ev["datasets"][0]["path"], open_web.to_str().unwrap());
    assert_eq!(ev["datasets"][0]["class"], "unclassified");
    // P2: by its dataset's file name.
    let ev = evidence(offshore(&opened, "node-paris", pid2).unwrap());
    let r = &ev["restricted_inputs"][0];
    assert_eq!(
        (r["kind"].as_str(), r["path"].as_str(), r["rule"].as_str()),
        (Some("dataset"), census.to_str(), Some("dataset[0]")),
        "{ev:#}"
    );
    assert_eq!(r["format"], "parquet");
    // P3: by its dataset's content, fingerprinted by the agent.
    let ev = evidence(offshore(&opened, "node-paris", pid3).unwrap());
    let r = &ev["restricted_inputs"][0];
    assert_eq!(
        (r["kind"].as_str(), r["sha256"].as_str(), r["rule"].as_str()),
        (
            Some("dataset"),
            Some(interviews_sha.as_str()),
            Some("dataset[1]")
        ),
        "{ev:#}"
    );
    // P1's checkpoints: derived from P1's run, the restricted base observed as their base.
    let p1_run = runs(&q)
        .await
        .into_iter()
        .filter_map(|s| s.run)
        .find(|r| r.pid == pid1)
        .unwrap();
    let derived = derivatives(&opened, "node-paris", "training-run");
    for d in &derived {
        let ev = evidence(d);
        assert_eq!(
            ev["derived_from_run"],
            format!("node-paris:{}", p1_run.run_id),
            "{ev:#}"
        );
        assert_eq!(ev["restricted_bases"][0]["name"], "acme/base-a");
        assert!(d.subject.starts_with("sha256:"), "{d:?}");
        let path = ev["paths"][0].as_str().unwrap();
        assert!(
            path.starts_with(runs_dir.join("p1").to_str().unwrap()),
            "{ev:#}"
        );
    }
    let lora = derivatives(&opened, "node-paris", "adapter-config");
    assert_eq!(lora.len(), 1, "{lora:?}");
    let ev = evidence(lora[0]);
    assert_eq!(ev["adapter_type"], "LORA", "{ev:#}");
    assert!(
        ev["paths"][0]
            .as_str()
            .unwrap()
            .starts_with(adapter.to_str().unwrap())
    );

    // P1, P2 and P3 stop: the agent reports their runs ended and the breaches resolve; the
    // derivatives, still on disk outside, stay open.
    drop((p1, p2, p3));
    let all = eventually(
        Duration::from_secs(60),
        "training-offshore resolved for P1-P3",
        || {
            let q = q.clone();
            async move {
                let all = breaches(&q).await;
                let resolved =
                    |pid| offshore(&all, "node-paris", pid).is_some_and(|b| b.state == "resolved");
                (resolved(pid1) && resolved(pid2) && resolved(pid3)).then_some(all)
            }
        },
    )
    .await;
    for pid in [pid1, pid2, pid3] {
        let b = offshore(&all, "node-paris", pid).unwrap();
        assert!(b.resolved_at_unix_ms >= b.opened_at_unix_ms, "{b:?}");
    }
    let ended: BTreeSet<u32> = runs(&q)
        .await
        .into_iter()
        .filter_map(|s| s.run)
        .filter(|r| r.ended)
        .map(|r| r.pid)
        .collect();
    assert!(
        ended.is_superset(&BTreeSet::from([pid1, pid2, pid3])),
        "{ended:?}"
    );
    let still: Vec<_> = derivatives(&all, "node-paris", "training-run")
        .into_iter()
        .chain(derivatives(&all, "node-paris", "adapter-config"))
        .collect();
    assert!(
        still.len() >= 3 && still.iter().all(|b| b.state == "open"),
        "{still:#?}"
    );

    // The derivatives are removed: restricted-derivative resolves.
    std::fs::remove_dir_all(runs_dir.join("p1")).unwrap();
    std::fs::remove_dir_all(&adapter).unwrap();
    let all = eventually(
        Duration::from_secs(60),
        "restricted-derivative resolved on node-paris",
        || {
            let q = q.clone();
            async move {
                let all = breaches(&q).await;
                let done = all
                    .iter()
                    .filter(|b| b.rule == "restricted-derivative")
                    .all(|b| b.state == "resolved");
                done.then_some(all)
            }
        },
    )
    .await;

    // Nothing for what is allowed: P4 (public base, unclassified dataset) and node-rabat
    // (inside: a restricted base and a restricted dataset, and their derivatives), nor P2's
    // checkpoints (derived from a public base). By now the rules ran many times over those
    // runs: the collector lists them with their checkpoints.
    let listed = runs(&q).await;
    for pid in [pid4, rpid] {
        let run = listed
            .iter()
            .filter_map(|s| s.run.as_ref())
            .find(|r| r.pid == pid)
            .unwrap_or_else(|| panic!("run of {pid} listed: {listed:#?}"));
        assert!(run.outputs.len() >= 2, "{run:#?}");
    }
    assert!(offshore(&all, "node-paris", pid4).is_none(), "{all:#?}");
    assert!(
        !all.iter().any(|b| b.node == "node-rabat"
            && (b.rule == "training-offshore" || b.rule == "restricted-derivative")),
        "{all:#?}"
    );
    let ours: Vec<&pb::BreachSummary> = all
        .iter()
        .filter(|b| b.rule == "training-offshore" || b.rule == "restricted-derivative")
        .collect();
    assert_eq!(
        ours.iter()
            .filter(|b| b.rule == "training-offshore")
            .count(),
        3,
        "{ours:#?}"
    );
    assert!(
        ours.iter().all(|b| b.rule != "restricted-derivative"
            || evidence(b)["restricted_bases"][0]["name"] == "acme/base-a"),
        "{ours:#?}"
    );

    // The webhook has each state change of these breaches once, open before resolved, in the
    // breach log's order (every record of the log, the other rules' included).
    let store = sov_collector::store::open("", &data).await.unwrap();
    let mut got: Vec<HttpRequest> = Vec::new();
    let log_len = store.breach_log_end().await.unwrap() as usize;
    eventually(
        Duration::from_secs(60),
        "every alert at the webhook",
        || {
            drain(&mut hook, &mut got);
            let done = got.len() >= log_len;
            async move { done.then_some(()) }
        },
    )
    .await;
    let seqs: Vec<u64> = got
        .iter()
        .map(|r| r.json()["seq"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (1..=log_len as u64).collect();
    assert_eq!(&seqs[..log_len], &expected[..], "in log order, once each");
    let mut per: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &got {
        let j = r.json();
        per.entry(j["breach_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(j["state"].as_str().unwrap().to_owned());
        assert!(r.headers.contains_key("x-sovereign-signature"));
    }
    for b in &ours {
        // Open first, resolved last, updates (evidence made more precise: a fingerprint that
        // arrived) only in between.
        let states = per.get(&b.breach_id).unwrap();
        assert_eq!(states.first().map(String::as_str), Some("open"), "{b:?}");
        assert_eq!(states.last().map(String::as_str), Some("resolved"), "{b:?}");
        assert!(
            states[1..states.len() - 1].iter().all(|s| s == "updated"),
            "{b:?}: {states:?}"
        );
    }

    drop((p4, r1));
    for (stop, task) in [(paris_stop, paris), (rabat_stop, rabat)] {
        stop.cancel();
        task.await.unwrap();
    }
    collector.stop().await;
}
