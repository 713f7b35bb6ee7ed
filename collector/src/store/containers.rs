//! Container identity at the collector (issue 13): who each process was, in container terms,
//! per node, minute and pid (`containers_minute`), taken from a report's processes, flows and
//! GPU processes as the agent named them, and how the queries join it (egress by pod,
//! namespace, image or container; GPU-seconds by namespace).
//!
//! Kept apart from the flow and weight write paths: a report's container rows are written by
//! one function per backend after its other rows, and read through [`FLOWS_WITH_CONTAINERS`]
//! only by the groupings that need them. Weight copies and users carry their container in
//! the stored weight file itself (`weight_files.detail`), read back by `rows::push_model`.

use std::collections::BTreeMap;

use sov_proto::pb;

use super::IncomingReport;

/// Longest container text kept per field (ids, names, image references, pod names); longer
/// text from a node is cut at a character boundary. Kubernetes names are at most 253 bytes
/// and image references rarely pass 255.
pub const MAX_CONTAINER_FIELD: usize = 512;

/// Most container rows one report writes (one per distinct minute and pid). A report carries
/// at most a few thousand processes and flows; anything past this is a hostile report and is
/// left out (the flows themselves are stored).
pub const MAX_CONTAINER_ROWS: usize = 20_000;

/// One `containers_minute` row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerRow {
    /// Start of the minute, Unix ms.
    pub minute_ms: i64,
    /// Process id on the node (0 for the flows whose owner is unknown but whose network
    /// namespace one pod owns).
    pub pid: u32,
    /// "containerd", "cri-o", "docker", "podman" or "".
    pub runtime: String,
    /// Container id.
    pub container_id: String,
    /// The container's name in the pod spec, else the runtime's name for it.
    pub container_name: String,
    /// Image reference.
    pub image: String,
    /// Image digest.
    pub image_digest: String,
    /// Kubernetes namespace.
    pub pod_namespace: String,
    /// Kubernetes pod name.
    pub pod_name: String,
    /// Kubernetes pod uid.
    pub pod_uid: String,
    /// "runtime" or "cgroup".
    pub source: String,
}

/// The columns of `containers_minute` after `node`, in the order [`ContainerRow`] lists them.
pub const CONTAINER_COLUMNS: &str = "minute_ms, pid, runtime, container_id, container_name, image, image_digest, \
     pod_namespace, pod_name, pod_uid, source";

fn cut(s: &str) -> String {
    if s.len() <= MAX_CONTAINER_FIELD {
        return s.to_owned();
    }
    let mut end = MAX_CONTAINER_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl ContainerRow {
    fn of(minute_ms: i64, pid: u32, c: &pb::ContainerRef) -> Self {
        let name = if c.container_name.is_empty() {
            &c.name
        } else {
            &c.container_name
        };
        Self {
            minute_ms,
            pid,
            runtime: cut(&c.runtime),
            container_id: cut(&c.id),
            container_name: cut(name),
            image: cut(&c.image),
            image_digest: cut(&c.image_digest),
            pod_namespace: cut(&c.pod_namespace),
            pod_name: cut(&c.pod_name),
            pod_uid: cut(&c.pod_uid),
            source: cut(&c.source),
        }
    }
}

fn minute(ms: i64) -> i64 {
    ms - ms.rem_euclid(60_000)
}

/// A container reference that names something (an id at least).
fn named(c: Option<&pb::ContainerRef>) -> Option<&pb::ContainerRef> {
    c.filter(|c| !c.id.is_empty() || !c.pod_name.is_empty())
}

/// The report's container rows, one per (minute, pid): each flow's owner in the flow's minute
/// (the minute its aggregate is stamped with), each containerised process and GPU process in
/// the report's minute. Where two name the same key the later in that order wins (they
/// agree unless the node is hostile).
pub fn rows_of(r: &IncomingReport) -> Vec<ContainerRow> {
    let mut rows: BTreeMap<(i64, u32), ContainerRow> = BTreeMap::new();
    let at = minute(r.observed_unix_ms);
    let t = &r.telemetry;
    let mut put = |m: i64, pid: u32, c: &pb::ContainerRef| {
        if rows.len() < MAX_CONTAINER_ROWS || rows.contains_key(&(m, pid)) {
            rows.insert((m, pid), ContainerRow::of(m, pid, c));
        }
    };
    for p in &t.processes {
        if let Some(c) = named(p.container.as_deref()) {
            put(at, p.pid, c);
        }
    }
    for g in &t.gpus {
        for p in &g.processes {
            if let Some(c) = named(p.container.as_ref()) {
                put(at, p.pid, c);
            }
        }
    }
    for f in &t.flows {
        if let Some(c) = named(f.flow.container.as_ref()) {
            let end = if f.flow.end_unix_ms > 0 {
                f.flow.end_unix_ms
            } else {
                r.observed_unix_ms
            };
            put(minute(end), f.flow.pid, c);
        }
    }
    rows.into_values().collect()
}

/// `flows_minute` with each row's container columns (`pod_namespace`, `pod_name`,
/// `container_name`, `container_id`, `image`; "" for host processes), under the same name so
/// that an egress query reads it in place of the table. Both backends accept it.
pub const FLOWS_WITH_CONTAINERS: &str = "(SELECT f.*, COALESCE(c.pod_namespace, '') AS pod_namespace,
        COALESCE(c.pod_name, '') AS pod_name, COALESCE(c.container_name, '') AS container_name,
        COALESCE(c.container_id, '') AS container_id, COALESCE(c.image, '') AS image
     FROM flows_minute f
     LEFT JOIN containers_minute c ON c.node = f.node AND c.minute_ms = f.minute_ms AND c.pid = f.pid)
     AS flows_minute";

/// The groupings that read container identity.
pub fn by_container(by: &str) -> bool {
    matches!(by, "pod" | "namespace" | "image" | "container" | "flow")
}

/// For an egress grouping by container identity: the first nine columns (as the other
/// groupings select them), the group-by list, and the five container columns selected after
/// the verdict and measurement columns. `text` is the backend's empty text ("''" or
/// "''::TEXT") and `num` its zero ("0" or "0::BIGINT"). `None` for other groupings.
pub fn egress_grouping(by: &str, text: &str, num: &str) -> Option<(String, &'static str)> {
    let (cols, group) = match by {
        "pod" => (
            format!("country, node, {text}, {num}, {num}, {text}, {text}, {num}, {text}"),
            "country, node, pod_namespace, pod_name",
        ),
        "namespace" => (
            format!("country, {text}, {text}, {num}, {num}, {text}, {text}, {num}, {text}"),
            "country, pod_namespace",
        ),
        "image" => (
            format!("country, {text}, {text}, {num}, {num}, {text}, {text}, {num}, {text}"),
            "country, image",
        ),
        "container" => (
            format!("country, node, {text}, {num}, {num}, {text}, {text}, {num}, {text}"),
            "country, node, container_id, pod_namespace, pod_name, container_name, image",
        ),
        _ => return None,
    };
    Some((cols, group))
}

/// The five container columns an egress query selects after the verdict and measurement
/// ones (`pod_namespace, pod_name, container_name, container_id, image`): those the grouping
/// names, empty text for the others.
pub fn egress_container_select(by: &str, text: &str) -> String {
    let pick = |col: &str, wanted: bool| {
        if wanted {
            col.to_owned()
        } else {
            text.to_owned()
        }
    };
    let all = matches!(by, "container" | "flow");
    [
        pick("pod_namespace", all || by == "pod" || by == "namespace"),
        pick("pod_name", all || by == "pod"),
        pick("container_name", all),
        pick("container_id", all),
        pick("image", all || by == "image"),
    ]
    .join(", ")
}

/// The group-by columns the "flow" grouping adds (the rules read the container of each flow).
pub const FLOW_CONTAINER_GROUP: &str =
    "pod_namespace, pod_name, container_name, container_id, image";

/// GPU usage with each row's Kubernetes namespace ("" outside a pod), as the scorecard reads
/// it: `node, pid, process_name, namespace, gpu_seconds` over `[?since, ?until)`.
pub const GPU_USAGE_WITH_NAMESPACE: &str =
    "SELECT g.node, g.pid, g.process_name, COALESCE(c.pod_namespace, '') AS ns,
            SUM(g.gpu_seconds)
     FROM gpu_usage g
     LEFT JOIN containers_minute c ON c.node = g.node AND c.pid = g.pid
          AND c.minute_ms = g.observed_ms - (g.observed_ms % 60000)";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FlowRecord, Telemetry};

    fn pod(id: &str, ns: &str) -> pb::ContainerRef {
        pb::ContainerRef {
            runtime: "containerd".into(),
            id: id.into(),
            name: id.into(),
            image: "docker.io/vllm/vllm-openai:v0.6.3".into(),
            pod_name: "web-0".into(),
            pod_namespace: ns.into(),
            container_name: "server".into(),
            source: "runtime".into(),
            ..Default::default()
        }
    }

    fn report(t: Telemetry) -> IncomingReport {
        IncomingReport {
            node: "n".into(),
            epoch: 1,
            seq: 1,
            observed_unix_ms: 120_500,
            received_unix_ms: 120_600,
            site: String::new(),
            country: String::new(),
            hostname: String::new(),
            agent_version: String::new(),
            labels: Default::default(),
            cpu_percent: 0.0,
            memory_used_bytes: 0,
            memory_total_bytes: 0,
            telemetry: t,
            gaps: vec![],
            body: vec![],
        }
    }

    #[test]
    fn flows_are_keyed_by_their_own_minute_and_host_processes_make_no_row() {
        let t = Telemetry {
            processes: vec![
                pb::ProcessInfo {
                    pid: 7,
                    container: Some(Box::new(pod("abc", "inference"))),
                    ..Default::default()
                },
                pb::ProcessInfo {
                    pid: 8,
                    ..Default::default()
                },
            ],
            flows: vec![FlowRecord {
                flow: pb::Flow {
                    pid: 7,
                    end_unix_ms: 59_000,
                    container: Some(pod("abc", "inference")),
                    ..Default::default()
                },
                ..Default::default()
            }],
            ..Default::default()
        };
        let rows = rows_of(&report(t));
        let keys: Vec<(i64, u32)> = rows.iter().map(|r| (r.minute_ms, r.pid)).collect();
        assert_eq!(keys, [(0, 7), (120_000, 7)]);
        assert_eq!(rows[0].container_name, "server", "the pod spec's name wins");
        assert_eq!(rows[0].pod_namespace, "inference");
    }

    #[test]
    fn overlong_fields_are_cut_at_a_character_boundary() {
        let mut c = pod("abc", "inference");
        c.image = "é".repeat(MAX_CONTAINER_FIELD);
        let row = ContainerRow::of(0, 1, &c);
        assert!(row.image.len() <= MAX_CONTAINER_FIELD);
        assert!(row.image.chars().all(|ch| ch == 'é'));
    }

    #[test]
    fn each_grouping_selects_only_its_own_container_columns() {
        assert_eq!(
            egress_container_select("namespace", "''"),
            "pod_namespace, '', '', '', ''"
        );
        assert_eq!(
            egress_container_select("flow", "''"),
            "pod_namespace, pod_name, container_name, container_id, image"
        );
        assert_eq!(
            egress_container_select("country", "''"),
            "'', '', '', '', ''"
        );
        assert!(egress_grouping("country", "''", "0").is_none());
        assert!(by_container("pod") && !by_container("asn"));
    }
}
