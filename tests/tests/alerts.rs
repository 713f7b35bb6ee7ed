//! Alert sinks against real receivers on loopback: a hand-written HTTP/1.1 server (webhook,
//! Alertmanager, Slack), UDP and TCP syslog listeners, and routing.
//!
//! The https-with-a-private-CA case and the HMAC check with ring live beside the code
//! (`collector/src/alert/http.rs`, `webhook.rs`): this crate has neither tokio-rustls nor ring.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::sync::Arc;

use sov_collector::alert::{
    Alert, Attempt, DeliveryError, Sink, attempt, routed, sinks_from_config,
};
use sov_collector::config::{
    AlertConfig, AlertmanagerSinkConfig, SlackSinkConfig, SyslogSinkConfig, WebhookSinkConfig,
};
use sov_e2e::receivers::http_receiver;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, UdpSocket};

fn alert(state: &str) -> Alert {
    Alert {
        seq: 42,
        breach_id: "b-42".into(),
        rule: "foreign-egress".into(),
        state: state.into(),
        severity: "critical".into(),
        node: "node-a".into(),
        subject: "python3 (pid 7) sent 5 MB to US \"quoted\" [x]".into(),
        evidence: serde_json::json!({"country": "US", "bytes_sent": 5_000_000}),
        at: "2025-03-04T05:06:07Z".into(),
        opened_at: "2025-03-04T05:00:00Z".into(),
        resolved_at: (state == "resolved").then(|| "2025-03-04T05:06:07Z".into()),
        checkpoint: None,
    }
}

fn one(cfg: AlertConfig) -> Arc<dyn Sink> {
    let mut sinks = sinks_from_config(&cfg).unwrap();
    assert_eq!(sinks.len(), 1);
    sinks.remove(0)
}

fn webhook(url: String, secret: Option<&str>) -> Arc<dyn Sink> {
    one(AlertConfig {
        webhook: vec![WebhookSinkConfig {
            url,
            secret: secret.map(str::to_owned),
            ..Default::default()
        }],
        ..Default::default()
    })
}

#[tokio::test]
async fn a_webhook_receives_the_documented_keys_signed_with_the_secret() {
    let (url, mut rx) = http_receiver(204).await;
    let sink = webhook(format!("{url}/hooks/sovereign?x=1"), Some("s3cret"));
    assert_eq!(sink.name(), "webhook:0");
    sink.deliver(&alert("open")).await.unwrap();
    let req = rx.recv().await.unwrap();
    assert_eq!(req.line, "POST /hooks/sovereign?x=1 HTTP/1.1");
    assert_eq!(req.headers["content-type"], "application/json");
    assert_eq!(req.headers["connection"], "close");
    assert_eq!(req.headers["x-sovereign-event"], "open");
    assert_eq!(
        req.headers["x-sovereign-signature"],
        sov_collector::alert::webhook::signature(b"s3cret", &req.body)
    );
    let body = req.json();
    for key in [
        "rule",
        "state",
        "severity",
        "node",
        "subject",
        "evidence",
        "breach_id",
        "at",
    ] {
        assert!(body.get(key).is_some(), "missing {key} in {body}");
    }
    assert_eq!(body["state"], "open");
    assert_eq!(body["evidence"]["country"], "US");

    // Without a secret: no signature header.
    let sink = webhook(url, None);
    sink.deliver(&alert("updated")).await.unwrap();
    let req = rx.recv().await.unwrap();
    assert!(!req.headers.contains_key("x-sovereign-signature"));
    assert_eq!(req.headers["x-sovereign-event"], "updated");
}

#[tokio::test]
async fn a_receiver_answering_500_is_retried_and_one_answering_400_is_not() {
    let (url, _rx) = http_receiver(500).await;
    let err = webhook(url, None)
        .deliver(&alert("open"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DeliveryError::Status { code: 500, body_prefix } if body_prefix == "see body."),
        "{err:?}"
    );
    assert!(err.retryable());

    let (url, _rx) = http_receiver(400).await;
    let sink = webhook(url, None);
    let err = sink.deliver(&alert("open")).await.unwrap_err();
    assert!(
        matches!(err, DeliveryError::Status { code: 400, .. }),
        "{err:?}"
    );
    assert!(!err.retryable());
    assert!(matches!(
        attempt(sink.as_ref(), &alert("open"), 0).await,
        Attempt::Failed(_)
    ));

    let (url, _rx) = http_receiver(429).await;
    let sink = webhook(url, None);
    match attempt(sink.as_ref(), &alert("open"), 3).await {
        Attempt::Retry { error, after } => {
            assert!(error.retryable());
            assert!(after >= std::time::Duration::from_secs(1));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_receiver_is_a_retryable_connect_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = webhook(format!("http://127.0.0.1:{port}/"), None)
        .deliver(&alert("open"))
        .await
        .unwrap_err();
    assert!(matches!(err, DeliveryError::Connect { .. }), "{err:?}");
    assert!(err.retryable());
}

#[tokio::test]
async fn alertmanager_gets_labels_and_starts_at_and_ends_at_only_on_resolve() {
    let (url, mut rx) = http_receiver(200).await;
    let sink = one(AlertConfig {
        alertmanager: vec![AlertmanagerSinkConfig {
            url: format!("{url}/"),
            ..Default::default()
        }],
        ..Default::default()
    });
    assert_eq!(sink.name(), "alertmanager:0");
    sink.deliver(&alert("open")).await.unwrap();
    let req = rx.recv().await.unwrap();
    assert_eq!(req.line, "POST /api/v2/alerts HTTP/1.1");
    let body = req.json();
    let a = &body.as_array().unwrap()[0];
    assert_eq!(a["labels"]["alertname"], "sovereign_foreign_egress");
    for (k, v) in [
        ("rule", "foreign-egress"),
        ("severity", "critical"),
        ("node", "node-a"),
        ("breach_id", "b-42"),
    ] {
        assert_eq!(a["labels"][k], v, "{a}");
    }
    assert!(a["labels"]["subject"].is_string());
    assert_eq!(a["startsAt"], "2025-03-04T05:00:00Z");
    assert!(a.get("endsAt").is_none(), "{a}");
    assert!(
        a["annotations"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("[CRITICAL]")
    );
    let evidence: serde_json::Value =
        serde_json::from_str(a["annotations"]["evidence"].as_str().unwrap()).unwrap();
    assert_eq!(evidence["bytes_sent"], 5_000_000);

    sink.deliver(&alert("resolved")).await.unwrap();
    let a = rx.recv().await.unwrap().json()[0].clone();
    assert_eq!(a["endsAt"], "2025-03-04T05:06:07Z");
    assert_eq!(a["startsAt"], "2025-03-04T05:00:00Z");
}

#[tokio::test]
async fn slack_gets_one_readable_text_line() {
    let (url, mut rx) = http_receiver(200).await;
    let sink = one(AlertConfig {
        slack: vec![SlackSinkConfig {
            url: format!("{url}/services/T/B/X"),
            ..Default::default()
        }],
        ..Default::default()
    });
    sink.deliver(&alert("open")).await.unwrap();
    let req = rx.recv().await.unwrap();
    assert_eq!(req.line, "POST /services/T/B/X HTTP/1.1");
    let text = req.json()["text"].as_str().unwrap().to_owned();
    assert!(
        text.starts_with("[CRITICAL] foreign-egress OPEN on node-a: python3 (pid 7) sent 5 MB"),
        "{text}"
    );
    assert!(text.contains("b-42"), "{text}");
}

/// Parse an RFC 5424 line: (PRI, VERSION, APP-NAME, MSGID, SD params, MSG).
fn parse_5424(line: &str) -> (u8, String, String, String, HashMap<String, String>, String) {
    let rest = line.strip_prefix('<').unwrap();
    let (pri, rest) = rest.split_once('>').unwrap();
    let mut fields = rest.splitn(7, ' ');
    let version = fields.next().unwrap().to_owned();
    let _timestamp = fields.next().unwrap();
    let _host = fields.next().unwrap();
    let app = fields.next().unwrap().to_owned();
    let _procid = fields.next().unwrap();
    let msgid = fields.next().unwrap().to_owned();
    let sd = fields.next().unwrap();
    let sd = sd.strip_prefix("[sovereign@32473").unwrap();
    // Walk the params, honouring backslash escapes, up to the unescaped ']'.
    let mut params = HashMap::new();
    let mut chars = sd.chars();
    let msg = loop {
        match chars.next().unwrap() {
            ' ' => {
                let mut name = String::new();
                for c in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    name.push(c);
                }
                assert_eq!(chars.next(), Some('"'));
                let mut value = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.push(chars.next().unwrap()),
                        '"' => break,
                        ']' => panic!("unescaped ] in {line}"),
                        c => value.push(c),
                    }
                }
                params.insert(name, value);
            }
            ']' => {
                let rest: String = chars.collect();
                break rest.strip_prefix(' ').unwrap_or(&rest).to_owned();
            }
            c => panic!("unexpected {c:?} in {line}"),
        }
    };
    (pri.parse().unwrap(), version, app, msgid, params, msg)
}

fn check_syslog_line(line: &str) {
    let (pri, version, app, msgid, params, msg) = parse_5424(line);
    assert_eq!(pri, 16 * 8 + 2, "{line}");
    assert_eq!(version, "1");
    assert_eq!(app, "sov-collector");
    assert_eq!(msgid, "breach-open");
    assert_eq!(params["rule"], "foreign-egress");
    assert_eq!(params["state"], "open");
    assert_eq!(params["severity"], "critical");
    assert_eq!(params["node"], "node-a");
    assert_eq!(params["breach_id"], "b-42");
    assert_eq!(params["subject"], alert("open").subject);
    assert!(
        msg.starts_with("[CRITICAL] foreign-egress OPEN on node-a"),
        "{msg}"
    );
}

fn syslog(address: String) -> Arc<dyn Sink> {
    one(AlertConfig {
        syslog: vec![SyslogSinkConfig {
            address,
            ..Default::default()
        }],
        ..Default::default()
    })
}

#[tokio::test]
async fn syslog_over_udp_sends_one_rfc5424_datagram() {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sink = syslog(format!("udp://{}", sock.local_addr().unwrap()));
    sink.deliver(&alert("open")).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, _) = sock.recv_from(&mut buf).await.unwrap();
    check_syslog_line(std::str::from_utf8(&buf[..n]).unwrap());
}

#[tokio::test]
async fn syslog_over_tcp_frames_each_message_by_octet_counting() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink = syslog(format!("tcp://{}", listener.local_addr().unwrap()));
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        all
    });
    sink.deliver(&alert("open")).await.unwrap();
    let all = String::from_utf8(reader.await.unwrap()).unwrap();
    let (len, msg) = all.split_once(' ').unwrap();
    assert_eq!(len.parse::<usize>().unwrap(), msg.len(), "{all}");
    check_syslog_line(msg);
}

#[tokio::test]
async fn alerts_are_routed_by_rule_and_minimum_severity() {
    let cfg = AlertConfig {
        webhook: vec![
            WebhookSinkConfig {
                url: "http://127.0.0.1:9/".into(),
                ..Default::default()
            },
            WebhookSinkConfig {
                url: "http://127.0.0.1:9/".into(),
                rules: vec!["restricted-model".into()],
                ..Default::default()
            },
        ],
        syslog: vec![SyslogSinkConfig {
            address: "udp://127.0.0.1:514".into(),
            min_severity: Some("critical".into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let sinks = sinks_from_config(&cfg).unwrap();
    let names = |a: &Alert| -> Vec<String> {
        routed(&sinks, a)
            .iter()
            .map(|s| s.name().to_owned())
            .collect()
    };
    let mut a = alert("open");
    assert_eq!(names(&a), ["webhook:0", "syslog:0"]);
    a.severity = "warning".into();
    assert_eq!(names(&a), ["webhook:0"]);
    a.rule = "restricted-model".into();
    assert_eq!(names(&a), ["webhook:0", "webhook:1"]);
}
