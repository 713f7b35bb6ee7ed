//! The Grafana dashboards and Prometheus rules under `deploy/` name only metrics that the
//! collector and the agent really expose: a renamed metric breaks this test, not a dashboard in
//! production that silently shows "No data". (`promtool check rules` and `promtool test rules`
//! run in `.ci/run`.)

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use sov_agent::metrics::{AgentMetrics, AgentScrape};
use sov_agent::prometheus::ProcessStats;
use sov_collector::config::WebhookSinkConfig;
use sov_e2e::{InProcessCollector, Pki, free_port};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Metric names (`sov_…`, `process_…`) written in a dashboard expression or a rule.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let at_word_start =
            i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &text[i..];
        if at_word_start && (rest.starts_with("sov_") || rest.starts_with("process_")) {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.insert(rest[..end].to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

/// Every `# TYPE name kind` in an exposition.
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The exposition, or `None` while the endpoint is not listening yet.
async fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    Some(text.split_once("\r\n\r\n")?.1.to_owned())
}

/// The expressions of a dashboard, checked for shape on the way.
fn dashboard_exprs(file: &str) -> Vec<String> {
    let path = repo().join("deploy/grafana").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
    assert!(
        json["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "{file}: uid"
    );
    assert!(
        json["title"].as_str().is_some_and(|u| !u.is_empty()),
        "{file}: title"
    );
    let panels = json["panels"].as_array().unwrap();
    assert!(!panels.is_empty(), "{file}: no panels");
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "{file}: duplicate panel id"
        );
        let title = p["title"].as_str().unwrap();
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{file}: panel {title:?} has no query");
        for t in targets {
            let e = t["expr"].as_str().unwrap();
            assert!(
                !e.trim().is_empty(),
                "{file}: panel {title:?} has an empty query"
            );
            exprs.push(e.to_owned());
        }
    }
    exprs
}

#[tokio::test]
async fn dashboards_and_alert_rules_name_only_metrics_the_binaries_expose() {
    // The collector with a policy and a sink, so that every family is present.
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let policy = data.path().join("policy.toml");
    std::fs::write(&policy, "jurisdiction = \"MA\"\n").unwrap();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.metrics.listen = Some(metrics_addr);
        c.policy = Some(policy.clone());
        c.alert.webhook.push(WebhookSinkConfig {
            url: format!("http://127.0.0.1:{}/hook", free_port()),
            secret: None,
            ca: None,
            rules: vec![],
            min_severity: None,
        });
    })
    .await;
    let collector_text = sov_e2e::eventually(
        std::time::Duration::from_secs(60),
        "the collector's /metrics to show the outbox and breach families",
        || async {
            let t = scrape(metrics_addr).await?;
            (t.contains("# TYPE sov_collector_outbox_depth ")
                && t.contains("# TYPE sov_collector_breaches_open "))
            .then_some(t)
        },
    )
    .await;
    collector.stop().await;

    let metrics = AgentMetrics::default();
    let agent_text = metrics.render(&AgentScrape {
        spool: Default::default(),
        cert_not_after_unix: Some(1),
        process: ProcessStats::read(),
    });

    let mut available = exposed(&collector_text);
    available.extend(exposed(&agent_text));
    for must in [
        "sov_collector_reports_ingested_total",
        "sov_agent_spool_bytes",
    ] {
        assert!(available.contains(must), "the expositions lack {must}");
    }

    let mut used: Vec<(String, String)> = Vec::new();
    for file in ["sovereign-collector.json", "sovereign-agents.json"] {
        for e in dashboard_exprs(file) {
            used.extend(metric_names(&e).into_iter().map(|n| (file.to_owned(), n)));
        }
    }
    let rules =
        std::fs::read_to_string(repo().join("deploy/prometheus/sovereign-rules.yml")).unwrap();
    for line in rules
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
    {
        used.extend(
            metric_names(line)
                .into_iter()
                .map(|n| ("sovereign-rules.yml".to_owned(), n)),
        );
    }
    assert!(used.len() > 20, "too few metric references found: {used:?}");
    let unknown: Vec<_> = used
        .iter()
        .filter(|(_, n)| !available.contains(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "deploy/ names metrics nobody exposes: {unknown:?}\nexposed: {available:?}"
    );
}

#[test]
fn metric_names_are_read_whole_and_only_at_word_starts() {
    let got = metric_names("rate(sov_a_total{x=\"y\"}[5m]) / my_sov_b + process_cpu_seconds_total");
    assert_eq!(
        got.into_iter().collect::<Vec<_>>(),
        ["process_cpu_seconds_total", "sov_a_total"]
    );
}
