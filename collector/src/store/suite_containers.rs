//! The store suite's container behaviours (issue 13), run on every backend by
//! [`super::suite::store_suite!`]: egress grouped by pod, namespace, image and container;
//! GPU-seconds by Kubernetes namespace; weight copies and users with their container.

use sov_proto::pb;

use super::suite::{Backend, ingest, report, telemetry, weight};
use super::{EgressQuery, FlowRecord, IngestOutcome, WeightUpdate};

/// A pod's container reference (containerd, kubelet labels).
pub(crate) fn pod(ns: &str, name: &str, image: &str) -> pb::ContainerRef {
    pb::ContainerRef {
        runtime: "containerd".into(),
        id: format!("{ns}-{name}-0123456789abcdef"),
        name: format!("{ns}-{name}"),
        image: image.into(),
        image_digest: "sha256:feed".into(),
        pod_name: name.into(),
        pod_namespace: ns.into(),
        pod_uid: "0b6f7e4c-1d2a-4c3b-9e8f-7a6b5c4d3e2f".into(),
        container_name: "server".into(),
        source: "runtime".into(),
        runtime_namespace: "k8s.io".into(),
    }
}

const VLLM: &str = "docker.io/vllm/vllm-openai:v0.6.3";
const TRAINER: &str = "registry.example/trainer:2";
/// Inside the queried range (minute 2).
const T: i64 = 150_000;

fn flow(pid: u32, sent: u64, container: Option<pb::ContainerRef>) -> FlowRecord {
    FlowRecord {
        flow: pb::Flow {
            protocol: pb::Protocol::Tcp as i32,
            remote_address: format!("203.0.113.{}", pid % 250),
            remote_port: 443,
            pid,
            bytes_sent: sent,
            direction: pb::Direction::Outbound as i32,
            connections: 1,
            start_unix_ms: T - 1000,
            end_unix_ms: T,
            container,
            ..Default::default()
        },
        process: format!("p{pid}").into(),
        country: "US".into(),
        asn: 64_500,
        org: "Transit".into(),
        geo_source: "test-db".into(),
        verdict: Default::default(),
    }
}

async fn egress(db: &dyn Backend, by: &str) -> Vec<pb::EgressRow> {
    db.store()
        .egress(EgressQuery {
            since_unix_ms: 60_000,
            until_unix_ms: 600_000,
            by: by.into(),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .0
}

pub(crate) async fn egress_is_grouped_by_pod_namespace_image_and_container(db: &dyn Backend) {
    // Node a: two vllm pods of namespace inference, a trainer pod of namespace batch, and a
    // host process. web-1's flow names no container itself: its process does.
    let mut r = report("a", 1, 1);
    r.observed_unix_ms = T + 500;
    r.telemetry.processes = vec![pb::ProcessInfo {
        pid: 11,
        name: "p11".into(),
        container: Some(Box::new(pod("inference", "web-1", VLLM))),
        ..Default::default()
    }];
    r.telemetry.flows = vec![
        flow(10, 1000, Some(pod("inference", "web-0", VLLM))),
        flow(11, 500, None),
        flow(20, 300, Some(pod("batch", "job-0", TRAINER))),
        flow(30, 200, None),
    ];
    assert_eq!(ingest(db.store(), r).await, IngestOutcome::Stored);

    let rows = egress(db, "pod").await;
    let got: Vec<(&str, &str, &str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r.pod_namespace.as_str(),
                r.pod_name.as_str(),
                r.node.as_str(),
                r.bytes_sent,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("inference", "web-0", "a", 1000),
            ("inference", "web-1", "a", 500),
            ("batch", "job-0", "a", 300),
            ("", "", "a", 200),
        ]
    );
    assert!(rows.iter().all(|r| r.image.is_empty() && r.pid == 0));

    let rows = egress(db, "namespace").await;
    let got: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| (r.pod_namespace.as_str(), r.bytes_sent))
        .collect();
    assert_eq!(got, [("inference", 1500), ("batch", 300), ("", 200)]);

    let rows = egress(db, "image").await;
    let got: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| (r.image.as_str(), r.bytes_sent))
        .collect();
    assert_eq!(got, [(VLLM, 1500), (TRAINER, 300), ("", 200)]);

    let rows = egress(db, "container").await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    let web0 = &rows[0];
    assert_eq!(
        (
            web0.container_id.as_str(),
            web0.container_name.as_str(),
            web0.pod_name.as_str(),
            web0.image.as_str(),
            web0.node.as_str()
        ),
        (
            "inference-web-0-0123456789abcdef",
            "server",
            "web-0",
            VLLM,
            "a"
        )
    );

    // The rules' grouping carries each flow's container with its process and destination.
    let rows = egress(db, "flow").await;
    let f = rows.iter().find(|r| r.pid == 20).unwrap();
    assert_eq!(
        (
            f.pod_namespace.as_str(),
            f.pod_name.as_str(),
            f.image.as_str()
        ),
        ("batch", "job-0", TRAINER)
    );
    assert_eq!((f.process.as_str(), f.remote_port), ("p20", 443));
    let host = rows.iter().find(|r| r.pid == 30).unwrap();
    assert_eq!((host.pod_name.as_str(), host.image.as_str()), ("", ""));
    // Groupings without container identity leave it empty.
    assert!(
        egress(db, "process")
            .await
            .iter()
            .all(|r| r.pod_name.is_empty())
    );
}

pub(crate) async fn gpu_seconds_are_named_with_their_kubernetes_namespace(db: &dyn Backend) {
    let store = db.store();
    // vllm (pid 4242) runs in pod inference/web-0 on node a; on node b it is a host process.
    let mut r = report("a", 1, 1);
    r.telemetry = telemetry();
    r.telemetry.processes[0].container = Some(Box::new(pod("inference", "web-0", VLLM)));
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    let mut r = report("b", 1, 1);
    r.telemetry = telemetry();
    r.telemetry.gpus[0].processes[0].gpu_seconds = 1.0;
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    let rows = store.gpu_usage(0, 10_000, 10).await.unwrap();
    let got: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.node.as_str(), r.pod_namespace.as_str()))
        .collect();
    assert_eq!(got, [("a", "inference"), ("b", "")]);
    assert!((rows[0].gpu_seconds - 7.5).abs() < 1e-9, "{rows:?}");
}

pub(crate) async fn weight_copies_and_users_carry_their_container(db: &dyn Backend) {
    let store = db.store();
    let sha = "c".repeat(64);
    let mut w = weight(
        "/var/lib/containerd/snapshots/12/fs/models/llama/model.safetensors",
        "llama",
        &sha,
    );
    w.container = Some(pod("inference", "web-0", VLLM));
    w.container_path = "/models/llama/model.safetensors".into();
    w.users[0].container = Some(Box::new(pod("inference", "web-0", VLLM)));
    let host = weight("/models/host.safetensors", "llama", &sha);
    let mut r = report("a", 1, 1);
    r.telemetry.weights = WeightUpdate {
        full: true,
        files: vec![w, host],
        removed: vec![],
        ..Default::default()
    };
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    let models = store.list_models("", "", 10).await.unwrap();
    assert_eq!(models.len(), 1, "{models:?}");
    let m = &models[0];
    let copy = m
        .copies
        .iter()
        .find(|c| c.container_path == "/models/llama/model.safetensors")
        .unwrap_or_else(|| panic!("the container's copy: {m:?}"));
    let c = copy.container.as_ref().unwrap();
    assert_eq!(
        (
            c.pod_namespace.as_str(),
            c.pod_name.as_str(),
            c.container_name.as_str(),
            c.image.as_str(),
            c.image_digest.as_str()
        ),
        ("inference", "web-0", "server", VLLM, "sha256:feed")
    );
    let host_copy = m
        .copies
        .iter()
        .find(|c| c.path == "/models/host.safetensors")
        .unwrap();
    assert_eq!(
        (
            host_copy.container.as_ref(),
            host_copy.container_path.as_str()
        ),
        (None, "")
    );
    let users: Vec<Option<&str>> = m
        .users
        .iter()
        .map(|u| u.container.as_ref().map(|c| c.pod_name.as_str()))
        .collect();
    assert!(
        users.contains(&Some("web-0")) && users.contains(&None),
        "{users:?}"
    );
}
