//! Every breach rule end to end, with real agents, real generated weight files, real processes
//! holding them, real traffic to hosts in a network namespace placed abroad by overrides, and
//! real alert receivers on loopback (webhook, Alertmanager, TCP syslog):
//!
//! - node-rabat (inside, MA): a process holding restricted weights sends 200 KB to France
//!   (`foreign-egress`, `weights-exfiltration`); another sends 200 KB to an allowed US address
//!   (no breach) and 200 KB to an address no database places (`unresolved-destination`);
//! - node-paris (the policy puts site paris in FR): restricted weights on disk
//!   (`weights-offshore`) and loaded by a process (`compute-offshore`);
//! - node-berlin declares DE but reports from an address placed in MA (`location-mismatch`),
//!   then stops (`agent-silent`), then comes back declaring MA;
//!
//! then everything stops and every breach resolves. One webhook receiver is down for the first
//! 60 s: afterwards it has every alert, exactly once per state change, like the one that was
//! up all along. Finally, a hand-edited breach log record makes `verify-log` fail naming it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sov_collector::auth::Role;
use sov_collector::config::{
    AlertmanagerSinkConfig, GeoOverride, SyslogSinkConfig, WebhookSinkConfig,
};
use sov_e2e::netns::{Netns, sink};
use sov_e2e::receivers::{HttpRequest, http_receiver, http_receiver_on, syslog_tcp_receiver};
use sov_e2e::{InProcessCollector, KillOnDrop, Pki, agent_config, eventually};
use sov_proto::pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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

[[allow]]
cidr = "ALLOWED/32"
reason = "contracted backup provider"

[thresholds]
foreign_egress_bytes = 100000
unresolved_bytes = 100000
window_secs = 10
silence_secs = 30
quiet_secs = 3
exfiltration_fraction = 0.5
"#;

/// A small real safetensors file.
fn safetensors_bytes(seed: u8) -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let a: Vec<u8> = (0..4096u32).map(|i| (i as u8).wrapping_add(seed)).collect();
    let tensors = vec![(
        "embed.weight",
        TensorView::new(Dtype::F32, vec![32, 32], &a).unwrap(),
    )];
    safetensors::serialize(tensors, None).unwrap()
}

/// A Hugging Face cache under `root` holding `org/name` as one safetensors file; returns the
/// snapshot path of the file.
fn hf_model(root: &Path, org: &str, name: &str, seed: u8) -> PathBuf {
    let blob = format!("{seed:0>64}");
    sov_e2e::hf_cache_model(
        &root.join("hub"),
        org,
        name,
        &blob,
        &safetensors_bytes(seed),
    )
}

/// A python3 process that opens `hold` (when given), connects to each of `to`, sends
/// `bytes` to each, prints "ready", and keeps everything open until killed.
fn python(hold: Option<&Path>, to: &[SocketAddr], bytes: usize) -> KillOnDrop {
    let script = r#"
import socket, sys, time
hold = sys.argv[1]; n = int(sys.argv[2])
f = open(hold, 'rb') if hold else None
socks = []
for a in sys.argv[3:]:
    host, port = a.rsplit(':', 1)
    s = socket.create_connection((host, int(port)))
    s.sendall(b'x' * n)
    socks.append(s)
print('ready', flush=True)
time.sleep(600)
"#;
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .arg(hold.map(|p| p.display().to_string()).unwrap_or_default())
        .arg(bytes.to_string());
    for a in to {
        cmd.arg(a.to_string());
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    KillOnDrop(child)
}

async fn breaches(
    q: &mut pb::query_client::QueryClient<tonic::transport::Channel>,
) -> Vec<pb::BreachSummary> {
    q.list_breaches(pb::ListBreachesRequest {
        limit: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .breaches
}

fn find<'a>(all: &'a [pb::BreachSummary], rule: &str, node: &str) -> Option<&'a pb::BreachSummary> {
    all.iter().find(|b| b.rule == rule && b.node == node)
}

/// Wait until every (rule, node) in `want` has a breach in `state`.
async fn wait_for(
    q: &pb::query_client::QueryClient<tonic::transport::Channel>,
    want: &[(&str, &str)],
    state: &str,
    within: Duration,
) -> Vec<pb::BreachSummary> {
    let what = format!("{state}: {want:?}");
    eventually(within, &what, || {
        let mut q = q.clone();
        async move {
            let all = breaches(&mut q).await;
            want.iter()
                .all(|(rule, node)| {
                    all.iter()
                        .any(|b| b.rule == *rule && b.node == *node && b.state == state)
                })
                .then_some(all)
        }
    })
    .await
}

/// Everything received so far.
fn drain<T>(rx: &mut mpsc::Receiver<T>, into: &mut Vec<T>) {
    while let Ok(x) = rx.try_recv() {
        into.push(x);
    }
}

/// The (seq, breach_id, state) of webhook bodies.
fn keys(reqs: &[HttpRequest]) -> Vec<(u64, String, String)> {
    reqs.iter()
        .map(|r| {
            let j = r.json();
            (
                j["seq"].as_u64().unwrap(),
                j["breach_id"].as_str().unwrap().to_owned(),
                j["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rule_opens_and_resolves_and_a_receiver_down_for_a_minute_gets_every_alert_once() {
    let started = Instant::now();
    let netns = match Netns::create(1, 3) {
        Ok(ns) => Some(ns),
        Err(e) => {
            sov_e2e::skipped(
                "breach_rules (network namespace part)",
                &format!("cannot create a network namespace ({e}): ran on loopback addresses"),
            );
            None
        }
    };
    let (fr, us, unplaced) = match &netns {
        Some(ns) => (
            ns.v4_peers[0].clone(),
            ns.v4_peers[1].clone(),
            ns.v4_peers[2].clone(),
        ),
        None => (
            "127.0.0.2".to_owned(),
            "127.0.0.3".to_owned(),
            "127.0.0.4".to_owned(),
        ),
    };
    let ns_name = netns.as_ref().map(|n| n.name.clone());
    let (_sink, port) = sink(ns_name.as_deref(), "0.0.0.0", 0);
    let addr = |ip: &str| -> SocketAddr { format!("{ip}:{port}").parse().unwrap() };

    // Receivers: a webhook up from the start, one that is down for 60 s, Alertmanager, syslog.
    let (w1_url, mut w1) = http_receiver(200).await;
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let w2_addr = down.local_addr().unwrap();
    drop(down);
    let (am_url, mut am) = http_receiver(200).await;
    let (syslog_addr, mut syslog) = syslog_tcp_receiver().await;

    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY.replace("ALLOWED", &us)).unwrap();
    let data = dir.path().join("data");
    let (p, w2_url) = (policy.clone(), format!("http://{w2_addr}"));
    let (fr_, us_) = (fr.clone(), us.clone());
    let collector = InProcessCollector::start(&pki, &data, move |c| {
        c.policy = Some(p);
        let o = |cidr: String, country: &str| GeoOverride {
            cidr,
            country: country.to_owned(),
            asn: Some(64_500),
            org: Some("Test Transit".to_owned()),
            operator_country: None,
        };
        c.geo.overrides = vec![
            o(format!("{fr_}/32"), "FR"),
            o(format!("{us_}/32"), "US"),
            // The agents' reports arrive from 127.0.0.1: place it in Morocco.
            o("127.0.0.1/32".to_owned(), "MA"),
        ];
        c.alert.webhook = vec![
            WebhookSinkConfig {
                url: w1_url,
                secret: Some("s3cret".to_owned()),
                ..Default::default()
            },
            WebhookSinkConfig {
                url: w2_url,
                ..Default::default()
            },
        ];
        c.alert.alertmanager = vec![AlertmanagerSinkConfig {
            url: am_url,
            ..Default::default()
        }];
        c.alert.syslog = vec![SyslogSinkConfig {
            address: syslog_addr,
            ..Default::default()
        }];
        c.alert.retry_max_secs = Some(3);
    })
    .await;
    let url = collector.url();

    // Weights: restricted models on node-rabat and node-paris.
    let roots = tempfile::tempdir().unwrap();
    let rabat_model = hf_model(&roots.path().join("rabat"), "acme", "secret-a", 1);
    let paris_model = hf_model(&roots.path().join("paris"), "acme", "secret-b", 2);
    let spools = tempfile::tempdir().unwrap();
    let agent = |name: &str, site: &str, country: &str, root: Option<PathBuf>| {
        let mut cfg = agent_config(&pki, name, vec![url.clone()], &spools.path().join(name));
        cfg.node.site = site.to_owned();
        cfg.node.country = country.to_owned();
        cfg.net.interval_secs = 1;
        cfg.net.include_loopback = netns.is_none();
        cfg.weights.roots = Some(root.into_iter().collect());
        cfg.weights.scan_interval_secs = 1;
        cfg.weights.hash_rate_mb_per_sec = 0;
        cfg
    };
    let (rabat_stop, rabat) = start_agent(agent(
        "node-rabat",
        "rabat",
        "MA",
        Some(roots.path().join("rabat/hub")),
    ));
    // node-paris declares MA, but the policy puts its site in France (the policy wins).
    let (paris_stop, paris) = start_agent(agent(
        "node-paris",
        "paris",
        "MA",
        Some(roots.path().join("paris/hub")),
    ));
    let (berlin_stop, berlin) = start_agent(agent("node-berlin", "berlin", "DE", None));

    // Processes: one holds node-rabat's restricted weights and sends to France; one sends to
    // the allowed US address and to the unplaced one; one loads node-paris's weights.
    let (a_fr, a_us, a_unplaced) = (addr(&fr), addr(&us), addr(&unplaced));
    let exfil = tokio::task::spawn_blocking({
        let m = rabat_model.clone();
        move || python(Some(&m), &[a_fr], 200_000)
    });
    let other = tokio::task::spawn_blocking(move || python(None, &[a_us, a_unplaced], 200_000));
    let loader = tokio::task::spawn_blocking({
        let m = paris_model.clone();
        move || python(Some(&m), &[], 0)
    });
    let (exfil, other, loader) = (
        exfil.await.unwrap(),
        other.await.unwrap(),
        loader.await.unwrap(),
    );

    let tls = pki.client_tls(Role::Regulator, "analyst");
    let q = pb::query_client::QueryClient::new(tls.connect(&url).await.unwrap());
    let opened = wait_for(
        &q,
        &[
            ("foreign-egress", "node-rabat"),
            ("unresolved-destination", "node-rabat"),
            ("weights-exfiltration", "node-rabat"),
            ("weights-offshore", "node-paris"),
            ("compute-offshore", "node-paris"),
            ("location-mismatch", "node-berlin"),
        ],
        "open",
        Duration::from_secs(60),
    )
    .await;
    let fe = find(&opened, "foreign-egress", "node-rabat").unwrap();
    assert_eq!(fe.subject, "country:FR");
    assert_eq!(fe.severity, "critical");
    let ev: serde_json::Value = serde_json::from_str(&fe.evidence_json).unwrap();
    assert_eq!(ev["country"], "FR");
    let dest = &ev["counters"]["destinations"][0];
    assert_eq!(dest["address"], fr.as_str());
    assert_eq!(dest["asn"], 64_500);
    assert_eq!(dest["process"], "python3");
    assert!(
        ev["counters"]["bytes_sent"].as_u64().unwrap() >= 200_000,
        "{ev}"
    );
    let ex = find(&opened, "weights-exfiltration", "node-rabat").unwrap();
    assert_eq!(ex.subject, format!("process:python3/{}", exfil.0.id()));
    let ev: serde_json::Value = serde_json::from_str(&ex.evidence_json).unwrap();
    assert_eq!(ev["models"][0]["model"], "acme/secret-a");
    let wo = find(&opened, "weights-offshore", "node-paris").unwrap();
    let ev: serde_json::Value = serde_json::from_str(&wo.evidence_json).unwrap();
    assert_eq!(ev["model"], "acme/secret-b");
    assert_eq!(ev["copies"][0]["node_country"], "FR");
    let co = find(&opened, "compute-offshore", "node-paris").unwrap();
    let ev: serde_json::Value = serde_json::from_str(&co.evidence_json).unwrap();
    assert_eq!(ev["processes"][0]["pid"], loader.0.id());
    let lm = find(&opened, "location-mismatch", "node-berlin").unwrap();
    let ev: serde_json::Value = serde_json::from_str(&lm.evidence_json).unwrap();
    assert_eq!(
        (
            ev["expected_country"].as_str(),
            ev["observed_country"].as_str()
        ),
        (Some("DE"), Some("MA"))
    );
    // The allowed destination opened nothing, and node-paris (outside) sending abroad is not
    // foreign egress.
    assert!(
        !opened
            .iter()
            .any(|b| b.rule == "foreign-egress"
                && (b.subject == "country:US" || b.node == "node-paris")),
        "{opened:?}"
    );

    // Stop everything: the traffic, the loader, node-paris's weights, node-berlin.
    drop((exfil, other, loader));
    std::fs::remove_dir_all(roots.path().join("paris/hub/models--acme--secret-b")).unwrap();
    berlin_stop.cancel();
    berlin.await.unwrap();
    wait_for(
        &q,
        &[("agent-silent", "node-berlin")],
        "open",
        Duration::from_secs(60),
    )
    .await;
    // node-berlin comes back, now declaring where it is.
    let (berlin_stop, berlin) = start_agent(agent("node-berlin", "rabat", "MA", None));
    let all = wait_for(
        &q,
        &[
            ("foreign-egress", "node-rabat"),
            ("unresolved-destination", "node-rabat"),
            ("weights-exfiltration", "node-rabat"),
            ("weights-offshore", "node-paris"),
            ("compute-offshore", "node-paris"),
            ("location-mismatch", "node-berlin"),
            ("agent-silent", "node-berlin"),
        ],
        "resolved",
        Duration::from_secs(120),
    )
    .await;
    for b in &all {
        if b.state == "resolved" {
            assert!(b.resolved_at_unix_ms >= b.opened_at_unix_ms, "{b:?}");
        }
    }

    // The second webhook was down for the first minute; bring it up.
    let elapsed = started.elapsed();
    if elapsed < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(60) - elapsed).await;
    }
    let listener = tokio::net::TcpListener::bind(w2_addr).await.unwrap();
    let mut w2 = http_receiver_on(listener, 200);

    // Every log record reaches every sink once: the webhook that was up all along, the one
    // that was down, Alertmanager and syslog. (Breaches may still change while we wait — the
    // other nodes see this host's traffic too — so wait until the log stops growing.)
    let store = sov_collector::store::open("", &data).await.unwrap();
    let (mut got1, mut got2, mut got_am, mut got_syslog) = (vec![], vec![], vec![], vec![]);
    let mut log_len = 0;
    for _ in 0..10 {
        log_len = store.breach_log_end().await.unwrap();
        eventually(
            Duration::from_secs(60),
            "every alert at every receiver",
            || {
                drain(&mut w1, &mut got1);
                drain(&mut w2, &mut got2);
                drain(&mut am, &mut got_am);
                drain(&mut syslog, &mut got_syslog);
                let n = log_len as usize;
                let done = got1.len() >= n
                    && got2.len() >= n
                    && got_am.len() >= n
                    && got_syslog.len() >= n;
                async move { done.then_some(()) }
            },
        )
        .await;
        // Give a duplicate the chance to show up.
        tokio::time::sleep(Duration::from_secs(2)).await;
        drain(&mut w1, &mut got1);
        drain(&mut w2, &mut got2);
        drain(&mut am, &mut got_am);
        drain(&mut syslog, &mut got_syslog);
        if store.breach_log_end().await.unwrap() == log_len {
            break;
        }
    }
    assert!(
        log_len >= 14,
        "7 breaches opened and resolved: {log_len} records"
    );
    let (k1, k2) = (keys(&got1), keys(&got2));
    let seqs: BTreeSet<u64> = k1.iter().map(|k| k.0).collect();
    assert_eq!(
        seqs.len(),
        k1.len(),
        "no duplicate at the first webhook: {k1:?}"
    );
    assert_eq!(
        seqs,
        (1..=log_len).collect(),
        "every state change, in the log's numbering"
    );
    assert_eq!(
        k1, k2,
        "the receiver that was down got the same alerts, once each, in order"
    );
    // Every alert carries the breach log's latest checkpoint, signed by the collector's key
    // (a receiver keeps it for `verify-log --checkpoint`).
    let collector_cert = std::fs::read_to_string(pki.server_files().cert).unwrap();
    let trust = sov_evidence::checkpoint::Trust::new(Some(&collector_cert), None).unwrap();
    for r in &got1 {
        let body = r.json();
        let cp = sov_evidence::checkpoint::SignedCheckpoint::from_json(&body["checkpoint"])
            .unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(cp.checkpoint.log, "breach-log");
        cp.verify(&trust).unwrap();
    }
    // Per breach, open comes first, and a resolved breach's last alert is its resolution.
    let final_states: BTreeMap<String, String> = breaches(&mut q.clone())
        .await
        .into_iter()
        .map(|b| (b.breach_id, b.state))
        .collect();
    let mut per: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (_, id, state) in &k1 {
        per.entry(id.as_str()).or_default().push(state.as_str());
    }
    let mut resolved = 0;
    for (id, states) in &per {
        assert_eq!(states.first(), Some(&"open"), "{id}: {states:?}");
        if final_states.get(*id).map(String::as_str) == Some("resolved") {
            resolved += 1;
            assert_eq!(states.last(), Some(&"resolved"), "{id}: {states:?}");
        }
    }
    assert!(
        got1.iter()
            .all(|r| r.headers.contains_key("x-sovereign-signature"))
    );
    assert!(
        got2.iter()
            .all(|r| !r.headers.contains_key("x-sovereign-signature"))
    );
    // Alertmanager: one alert per post; endsAt only on resolutions.
    assert_eq!(got_am.len(), log_len as usize);
    let resolved_posts = got_am
        .iter()
        .filter(|r| r.json()[0].get("endsAt").is_some())
        .count();
    assert_eq!(
        resolved_posts, resolved,
        "one resolution per resolved breach"
    );
    assert_eq!(got_syslog.len(), log_len as usize);
    assert!(got_syslog.iter().any(|m| m.contains("foreign-egress")));

    for (stop, task) in [
        (rabat_stop, rabat),
        (paris_stop, paris),
        (berlin_stop, berlin),
    ] {
        stop.cancel();
        task.await.unwrap();
    }
    collector.stop().await;
}

fn verify_log(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(sov_e2e::bin_path("e2e-collector"))
        .args(["verify-log", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn a_hand_edited_breach_log_record_makes_verify_log_fail_naming_it() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = sov_collector::store::open("", &data).await.unwrap();
    for (i, country) in ["FR", "DE", "US"].iter().enumerate() {
        store
            .observe_breach(sov_collector::breach::Observation {
                rule: "foreign-egress".into(),
                node: "node-a".into(),
                subject: format!("country:{country}"),
                severity: sov_collector::breach::Severity::Critical,
                evidence: serde_json::json!({"country": country}),
                at_unix_ms: 1_800_000_000_000 + i as i64,
            })
            .await
            .unwrap();
    }
    // The collector signs the log's head with its key (at start, every interval, at shutdown).
    let files = pki.server_files();
    sov_collector::checkpoint::Checkpointer {
        store: store.clone(),
        signer: std::sync::Arc::new(
            sov_evidence::report::ReportSigner::load(&files.cert, &files.key).unwrap(),
        ),
        interval: std::time::Duration::from_secs(60),
    }
    .sign_heads()
    .await
    .unwrap();
    drop(store);
    let cfg = sov_collector::config::CollectorConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        data.clone(),
        pki.server_files(),
    );
    let config = dir.path().join("collector.toml");
    sov_e2e::write_collector_toml(&cfg, &config);
    let (code, out) = verify_log(&config);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("3 records"), "{out}");

    // Someone with write access to the database removes the guard and rewrites history.
    let db = rusqlite::Connection::open(data.join("sovereign.db")).unwrap();
    db.execute_batch(
        "DROP TRIGGER breach_log_no_update;
         UPDATE breach_log SET body = replace(body, '\"DE\"', '\"MA\"') WHERE seq = 2;",
    )
    .unwrap();
    drop(db);
    let (code, out) = verify_log(&config);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("record 2"), "names the edited record: {out}");
}
