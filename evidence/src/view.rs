//! How the answers are printed, identically by `sovctl` (`--output json|csv|table`) and the
//! HTTPS API (the same JSON objects): one function per object (`*_json`), the columns of each
//! table, the scorecard's and the policy's rows, and the three renderings.

use serde_json::{Value, json};
use sov_proto::pb;

/// The columns of `sovctl policy` as a table or CSV (JSON prints the whole object).
pub const POLICY_COLUMNS: [&str; 3] = ["section", "item", "value"];

/// The policy as rows of `section`, `item`, `value`.
pub fn policy_rows(p: &Value) -> Vec<Value> {
    let row = |section: &str, item: String, value: String| serde_json::json!({"section": section, "item": item, "value": value});
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut rows = vec![
        row("policy", "file".into(), text(&p["file"])),
        row("policy", "jurisdiction".into(), text(&p["jurisdiction"])),
        row("policy", "inside".into(), text(&p["inside"])),
    ];
    for (site, country) in p["sites"].as_object().into_iter().flatten() {
        rows.push(row("site", site.clone(), text(country)));
    }
    for m in p["models"].as_array().into_iter().flatten() {
        rows.push(row("model", text(&m["match"]), text(&m["class"])));
    }
    for a in p["allow"].as_array().into_iter().flatten() {
        let expires = match &a["expires"] {
            Value::Null => "never".to_owned(),
            e => text(e),
        };
        let state = if a["active"] == true {
            "active"
        } else {
            "expired"
        };
        rows.push(row(
            "allow",
            text(&a["target"]),
            format!("{} (expires {expires}, {state})", text(&a["reason"])),
        ));
    }
    for (k, v) in p["thresholds"].as_object().into_iter().flatten() {
        rows.push(row("threshold", k.clone(), text(v)));
    }
    for w in p["warnings"].as_array().into_iter().flatten() {
        rows.push(row("warning", String::new(), text(w)));
    }
    rows
}

/// The columns of `sovctl audit`, in order; the JSON objects carry at least these keys.
pub const AUDIT_COLUMNS: [&str; 9] = [
    "seq", "at", "who", "role", "via", "call", "rows", "outcome", "hash",
];

/// The columns of `sovctl scorecard` as a table or CSV (JSON prints the whole object).
pub const SCORECARD_COLUMNS: [&str; 3] = ["question", "measure", "value"];

/// The scorecard's headline numbers as rows of `question`, `measure`, `value`.
pub fn scorecard_rows(s: &Value) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut add = |q: &str, m: &str, v: &Value| {
        rows.push(json!({"question": q, "measure": m, "value": v}));
    };
    add("scope", "jurisdiction", &s["jurisdiction"]);
    add("scope", "since", &s["since"]);
    if !s["from"].is_null() {
        add("scope", "from", &s["from"]);
    }
    add("scope", "until", &s["until"]);
    let w = &s["weights"];
    for k in [
        "models",
        "copies",
        "copies_inside",
        "copies_outside",
        "share_outside",
    ] {
        add("who holds the weights", k, &w[k]);
    }
    for o in w["by_origin"].as_array().into_iter().flatten() {
        add(
            "who holds the weights",
            &format!("copies of {} models", o["origin"].as_str().unwrap_or("")),
            &o["copies"],
        );
    }
    let c = &s["compute"];
    for k in ["gpu_hours", "gpu_hours_inside", "gpu_hours_outside"] {
        add("where AI runs", k, &c[k]);
    }
    for o in c["by_model_origin"].as_array().into_iter().flatten() {
        add(
            "where AI runs",
            &format!("gpu_hours on {} models", o["origin"].as_str().unwrap_or("")),
            &o["gpu_hours"],
        );
    }
    for o in c["by_namespace"].as_array().into_iter().flatten() {
        let label = match o["namespace"].as_str().unwrap_or("") {
            "" => "gpu_hours outside Kubernetes pods".to_owned(),
            ns => format!("gpu_hours in namespace {ns}"),
        };
        add("where AI runs", &label, &o["gpu_hours"]);
    }
    let d = &s["data"];
    for k in [
        "bytes_sent",
        "bytes_sent_outside",
        "bytes_sent_unplaced",
        "bytes_sent_physically_impossible",
        "bytes_sent_inside_foreign_operated",
        "share_leaving",
    ] {
        add("where data flows", k, &d[k]);
    }
    add(
        "where data flows",
        "contested destinations",
        &d["contested"]["destinations"],
    );
    add(
        "where data flows",
        "bytes_sent to contested destinations",
        &d["contested"]["bytes_sent"],
    );
    for o in d["by_country"].as_array().into_iter().flatten() {
        let counted = o["counted"].as_str().unwrap_or("");
        let country = o["country"].as_str().unwrap_or("");
        // Bytes to unplaced destinations are `bytes_sent_unplaced` above: no row with an
        // empty country.
        if country.is_empty() || counted == "unplaced" {
            continue;
        }
        let label = match counted {
            "review" => format!("bytes_sent to {country} (physically impossible, for review)"),
            _ => format!("bytes_sent to {country}"),
        };
        add("where data flows", &label, &o["bytes_sent"]);
    }
    let m = &d["measurement"];
    for k in [
        "share_exact",
        "share_conntrack",
        "bytes_exact",
        "bytes_conntrack",
        "flows_unmeasured",
    ] {
        add("how bytes were measured", k, &m[k]);
    }
    let p = &s["completeness"];
    for k in [
        "nodes",
        "nodes_reporting",
        "missing_reports",
        "dropped_reports",
    ] {
        add("how complete", k, &p[k]);
    }
    add(
        "how complete",
        "silent_nodes",
        &json!(p["silent_nodes"].as_array().map_or(0, Vec::len)),
    );
    rows
}

/// The columns of `sovctl breaches`, in order; the JSON objects carry at least these keys.
pub const BREACH_COLUMNS: [&str; 8] = [
    "breach_id",
    "rule",
    "state",
    "severity",
    "node",
    "subject",
    "opened_at",
    "resolved_at",
];

/// One breach as the JSON object `sovctl breaches --output json` prints (times RFC 3339,
/// `resolved_at` null while open; `evidence` parsed back into JSON).
pub fn breach_json(b: &pb::BreachSummary) -> Value {
    json!({
        "breach_id": b.breach_id,
        "rule": b.rule,
        "state": b.state,
        "severity": b.severity,
        "node": b.node,
        "subject": b.subject,
        "opened_at": rfc3339(b.opened_at_unix_ms),
        "last_seen": rfc3339(b.last_seen_unix_ms),
        "resolved_at": if b.resolved_at_unix_ms > 0 {
            Value::String(rfc3339(b.resolved_at_unix_ms))
        } else {
            Value::Null
        },
        "count": b.count,
        "evidence": serde_json::from_str::<Value>(&b.evidence_json).unwrap_or(Value::Null),
    })
}

/// Groupings of egress rows (`sovctl egress --by`, `/api/v1/egress?by=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressBy {
    /// Per destination country.
    Country,
    /// Per node and destination country.
    Node,
    /// Per node, process and destination country.
    Process,
    /// Per destination ASN.
    Asn,
    /// Per remote address and port.
    Destination,
    /// Per Kubernetes pod (namespace and name, on its node) and destination country.
    Pod,
    /// Per Kubernetes namespace and destination country.
    Namespace,
    /// Per container image and destination country.
    Image,
    /// Per container (node, id, name, pod, image) and destination country.
    Container,
}

impl EgressBy {
    /// Every grouping, in the order `--help` lists them.
    pub const ALL: [Self; 9] = [
        Self::Country,
        Self::Node,
        Self::Process,
        Self::Asn,
        Self::Destination,
        Self::Pod,
        Self::Namespace,
        Self::Image,
        Self::Container,
    ];

    /// Its name: `country`, `node`, `process`, `asn`, `destination`, `pod`, `namespace`,
    /// `image` or `container`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Country => "country",
            Self::Node => "node",
            Self::Process => "process",
            Self::Asn => "asn",
            Self::Destination => "destination",
            Self::Pod => "pod",
            Self::Namespace => "namespace",
            Self::Image => "image",
            Self::Container => "container",
        }
    }

    /// The columns a table or CSV of this grouping shows, in order.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            Self::Country => &[
                "country",
                "bytes_sent",
                "bytes_received",
                "connections",
                "min_rtt_ms",
                "measured",
            ],
            Self::Node => &[
                "node",
                "country",
                "bytes_sent",
                "bytes_received",
                "connections",
                "min_rtt_ms",
                "measured",
            ],
            Self::Process => &[
                "node",
                "process",
                "pid",
                "country",
                "bytes_sent",
                "bytes_received",
                "connections",
                "min_rtt_ms",
                "measured",
            ],
            Self::Asn => &[
                "asn",
                "org",
                "country",
                "bytes_sent",
                "bytes_received",
                "connections",
                "min_rtt_ms",
                "measured",
            ],
            Self::Destination => &[
                "remote_address",
                "remote_port",
                "country",
                "asn",
                "org",
                "operator_country",
                "bytes_sent",
                "bytes_received",
                "min_rtt_ms",
                "measured",
                "physics",
                "answers_text",
            ],
            Self::Pod => &[
                "namespace",
                "pod",
                "node",
                "country",
                "bytes_sent",
                "bytes_received",
                "connections",
                "min_rtt_ms",
                "measured",
            ],
            Self::Namespace => &[
                "namespace",
                "country",
                "bytes_sent",
                "bytes_received",
                "connections",
                "min_rtt_ms",
                "measured",
            ],
            Self::Image => &[
                "image",
                "country",
                "bytes_sent",
                "bytes_received",
                "connections",
                "min_rtt_ms",
                "measured",
            ],
            Self::Container => &[
                "node",
                "namespace",
                "pod",
                "container",
                "container_id",
                "image",
                "country",
                "bytes_sent",
                "bytes_received",
                "connections",
                "min_rtt_ms",
                "measured",
            ],
        }
    }
}

impl std::str::FromStr for EgressBy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "by {s:?} is not one of country, node, process, asn, destination, pod, namespace, image, container"
                )
            })
    }
}

/// "90m", "24h", "7d", "30s" → milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: i64 = num.parse().map_err(|_| {
        format!("{text:?} is not a duration: use a number and s, m, h or d (e.g. 7d)")
    })?;
    let per = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" | "" => 86_400_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use s, m, h or d"
            ));
        }
    };
    n.checked_mul(per)
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("{text:?} is out of range"))
}

/// An egress row for a table or CSV: [`egress_json`], with "unplaced" where no database
/// placed the destination (JSON keeps the empty string, as the API documents it).
pub fn egress_row(r: &pb::EgressRow, by: EgressBy) -> Value {
    let mut v = egress_json(r, by);
    if r.country.is_empty() {
        v["country"] = json!(UNPLACED);
    }
    // Traffic of processes outside every container groups under empty names: say so.
    for key in ["namespace", "pod", "image", "container", "container_id"] {
        if v.get(key).and_then(Value::as_str) == Some("") {
            v[key] = json!(NO_CONTAINER);
        }
    }
    v
}

/// What tables say for a destination no geolocation database places.
pub const UNPLACED: &str = "unplaced";

/// What tables say where traffic came from no container (a host process), or from a
/// container outside Kubernetes under the pod columns.
pub const NO_CONTAINER: &str = "-";

/// One egress row as JSON (`sovctl egress --output json`, the API).
/// How a row's bytes were measured, in words: `exact` (tcp_info), `conntrack`, both, and how
/// many flows carried no byte count (`2 unmeasured`).
pub fn measured_text(r: &pb::EgressRow) -> String {
    let total = r.bytes_sent.saturating_add(r.bytes_received);
    let mut parts = Vec::new();
    if total > r.conntrack_bytes {
        parts.push("exact".to_owned());
    }
    if r.conntrack_bytes > 0 {
        parts.push("conntrack".to_owned());
    }
    if r.unmeasured_flows > 0 {
        parts.push(format!("{} unmeasured", r.unmeasured_flows));
    }
    parts.join("+")
}

/// Every source's answer side by side, for a table cell:
/// `FR geofeed:feed@2026-11-01 (impossible: 1107 km) | MA embedded:iptocc-1.4.175`.
pub fn answers_text(r: &pb::EgressRow) -> String {
    r.answers
        .iter()
        .map(|a| {
            if a.impossible {
                format!(
                    "{} {} (impossible: {} km)",
                    a.country, a.source, a.distance_km
                )
            } else {
                format!("{} {}", a.country, a.source)
            }
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The destinations named in breaches' evidence, once each, with every source's answer side
/// by side (for signed reports): address, port, country, answers (and as text), the
/// speed-of-light check (min RTT, distance, limit) and the operator's country.
pub fn breach_destinations(breaches: &[Value]) -> Vec<Value> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for b in breaches {
        let list = b["evidence"]["counters"]["destinations"].as_array();
        for d in list.into_iter().flatten() {
            let key = (cell(&d["address"]), cell(&d["port"]));
            if !seen.insert(key) {
                continue;
            }
            let answers: Vec<String> = d["answers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    if a["impossible"].as_bool() == Some(true) {
                        format!(
                            "{} {} (impossible: {} km)",
                            cell(&a["country"]),
                            cell(&a["source"]),
                            cell(&a["distance_km"])
                        )
                    } else {
                        format!("{} {}", cell(&a["country"]), cell(&a["source"]))
                    }
                })
                .collect();
            out.push(json!({
                "address": d["address"],
                "port": d["port"],
                "country": d["country"],
                "operator_country": d["operator_country"],
                "contested": d["contested"],
                "physics": d["physics"],
                "min_rtt_us": d["min_rtt_us"],
                "distance_km": d["distance_km"],
                "limit_km": d["limit_km"],
                "answers": d["answers"],
                "answers_text": answers.join(" | "),
            }));
        }
    }
    out
}

/// Columns of the breach destinations' verdicts in a report.
pub const DESTINATION_COLUMNS: [&str; 9] = [
    "address",
    "port",
    "country",
    "operator_country",
    "physics",
    "min_rtt_us",
    "distance_km",
    "limit_km",
    "answers_text",
];

/// One egress row as JSON.
pub fn egress_json(r: &pb::EgressRow, by: EgressBy) -> Value {
    let mut v = json!({
        "country": r.country,
        "bytes_sent": r.bytes_sent,
        "bytes_received": r.bytes_received,
        "connections": r.connections,
        "min_rtt_ms": (r.min_rtt_us > 0).then(|| f64::from(r.min_rtt_us) / 1000.0),
        "conntrack_bytes": r.conntrack_bytes,
        "unmeasured_flows": r.unmeasured_flows,
        "measured": measured_text(r),
    });
    match by {
        EgressBy::Country => {}
        EgressBy::Node => v["node"] = json!(r.node),
        EgressBy::Process => {
            v["node"] = json!(r.node);
            v["process"] = json!(r.process);
            v["pid"] = json!(r.pid);
        }
        EgressBy::Asn => {
            v["asn"] = json!(r.asn);
            v["org"] = json!(r.org);
        }
        EgressBy::Destination => {
            v["remote_address"] = json!(r.remote_address);
            v["remote_port"] = json!(r.remote_port);
            v["asn"] = json!(r.asn);
            v["org"] = json!(r.org);
            v["geo_source"] = json!(r.geo_source);
            v["operator_country"] = json!(r.operator_country);
            v["contested"] = json!(r.contested);
            v["physics"] = json!(r.physics);
            v["distance_km"] = json!(r.distance_km);
            v["limit_km"] = json!(r.limit_km);
            v["answers"] = r
                .answers
                .iter()
                .map(|a| {
                    json!({
                        "source": a.source,
                        "country": a.country,
                        "kind": a.kind,
                        "impossible": a.impossible,
                        "distance_km": a.distance_km,
                    })
                })
                .collect();
            v["answers_text"] = json!(answers_text(r));
        }
        EgressBy::Pod => {
            v["node"] = json!(r.node);
            v["namespace"] = json!(r.pod_namespace);
            v["pod"] = json!(r.pod_name);
        }
        EgressBy::Namespace => v["namespace"] = json!(r.pod_namespace),
        EgressBy::Image => v["image"] = json!(r.image),
        EgressBy::Container => {
            v["node"] = json!(r.node);
            v["namespace"] = json!(r.pod_namespace);
            v["pod"] = json!(r.pod_name);
            v["container"] = json!(r.container_name);
            v["container_id"] = json!(r.container_id);
            v["image"] = json!(r.image);
        }
    }
    v
}

/// A container reference as JSON (`sovctl models` copies and users, the API): runtime, id,
/// name, image and digest, the Kubernetes pod (namespace, name, uid) and the container's name
/// in it, and how it was learned; `null` for a host file or process.
pub fn container_json(c: Option<&pb::ContainerRef>) -> Value {
    match c {
        None => Value::Null,
        Some(c) => json!({
            "runtime": c.runtime,
            "id": c.id,
            "name": c.name,
            "image": c.image,
            "image_digest": c.image_digest,
            "namespace": c.pod_namespace,
            "pod": c.pod_name,
            "pod_uid": c.pod_uid,
            "container": c.container_name,
            "source": c.source,
        }),
    }
}

/// `namespace/pod` of a container reference ("" outside Kubernetes or for a host process).
pub fn pod_of(c: Option<&pb::ContainerRef>) -> String {
    match c {
        Some(c) if !c.pod_name.is_empty() => format!("{}/{}", c.pod_namespace, c.pod_name),
        _ => String::new(),
    }
}

/// Columns of `sovctl models` as a table or CSV.
pub const MODEL_COLUMNS: [&str; 11] = [
    "model",
    "format",
    "sha256",
    "size",
    "params",
    "copies",
    "countries",
    "users",
    "pods",
    "revision",
    "base_models",
];

/// Columns of `sovctl training` as a table or CSV.
pub const TRAINING_COLUMNS: [&str; 11] = [
    "node",
    "country",
    "pod",
    "process",
    "pid",
    "start",
    "last_activity",
    "gpu_hours",
    "inputs",
    "outputs",
    "ended",
];

/// One training run as the JSON object `sovctl training --output json` prints.
pub fn training_json(s: &pb::TrainingRunSummary) -> Value {
    let run = s.run.clone().unwrap_or_default();
    let c = run.container.clone().unwrap_or_default();
    json!({
        "node": s.node,
        "site": s.site,
        "country": s.country,
        "run_id": run.run_id,
        "pid": run.pid,
        "process": run.process,
        "container": c.id,
        "pod": if c.pod_name.is_empty() { String::new() } else { format!("{}/{}", c.pod_namespace, c.pod_name) },
        "start": rfc3339(run.start_unix_ms),
        "last_activity": rfc3339(run.last_activity_unix_ms),
        "gpu_seconds": run.gpu_seconds,
        "gpu_hours": run.gpu_seconds / 3600.0,
        "ended": run.ended,
        "inputs": run.inputs.iter().map(|i| json!({
            "kind": i.kind,
            "path": i.path,
            "size": i.size_bytes,
            "sha256": i.sha256,
            "model": i.model,
            "format": i.format,
            "mapped": i.mapped,
        })).collect::<Vec<_>>(),
        "outputs": run.outputs.iter().map(|o| json!({
            "path": o.path,
            "size": o.size_bytes,
            "mtime": rfc3339(o.mtime_unix_ms),
            "sha256": o.sha256,
            "model": o.model,
        })).collect::<Vec<_>>(),
        "inputs_left_out": run.inputs_left_out,
        "outputs_left_out": run.outputs_left_out,
        "first_seen": rfc3339(s.first_seen_unix_ms),
        "last_seen": rfc3339(s.last_seen_unix_ms),
    })
}

/// A training run flattened for tables and CSV: inputs as `model`/`format:path` text, outputs
/// counted.
pub fn training_row(s: &pb::TrainingRunSummary) -> Value {
    let mut v = training_json(s);
    let run = s.run.clone().unwrap_or_default();
    let inputs: Vec<String> = run
        .inputs
        .iter()
        .map(|i| {
            if i.kind == "base-weights" && !i.model.is_empty() {
                i.model.clone()
            } else {
                format!("{}:{}", i.format, i.path)
            }
        })
        .collect();
    v["inputs"] = json!(inputs.join(" "));
    v["outputs"] = json!(run.outputs.len() as u64 + u64::from(run.outputs_left_out));
    v["gpu_hours"] = json!(format!("{:.3}", run.gpu_seconds / 3600.0));
    v
}

/// A declared base as table text: `name (origin)`, or the name alone when its origin is unknown.
pub fn base_text(b: &pb::ModelBase) -> String {
    if b.origin.is_empty() {
        b.name.clone()
    } else {
        format!("{} ({})", b.name, b.origin)
    }
}

/// One model as the JSON object `sovctl models --output json` prints.
pub fn model_json(m: &pb::ModelSummary) -> Value {
    let mut countries: Vec<&str> = m.copies.iter().map(|c| c.country.as_str()).collect();
    countries.sort_unstable();
    countries.dedup();
    let mut pods: Vec<String> = m
        .copies
        .iter()
        .map(|c| pod_of(c.container.as_ref()))
        .chain(m.users.iter().map(|u| pod_of(u.container.as_ref())))
        .filter(|p| !p.is_empty())
        .collect();
    pods.sort_unstable();
    pods.dedup();
    json!({
        "model": m.model,
        "identity_source": m.identity_source,
        "format": m.format,
        "sha256": m.sha256,
        "size": m.size_bytes,
        "params": (m.parameter_count > 0).then_some(m.parameter_count),
        "revision": m.revision,
        "repo_path": m.repo_path,
        "publisher": m.publisher,
        "copies": m.copies.iter().map(|c| json!({
            "node": c.node,
            "site": c.site,
            "country": c.country,
            "path": c.path,
            "storage": c.storage,
            "server": c.server,
            "mount_point": c.mount_point,
            "first_seen": rfc3339(c.first_seen_unix_ms),
            "last_seen": rfc3339(c.last_seen_unix_ms),
            "container": container_json(c.container.as_ref()),
            "container_path": c.container_path,
            "hashing_percent": c.hashing_percent,
        })).collect::<Vec<_>>(),
        "users": m.users.iter().map(|u| json!({
            "node": u.node,
            "pid": u.pid,
            "process": u.process,
            "gpus": u.gpus,
            "path": u.path,
            "container": container_json(u.container.as_ref()),
        })).collect::<Vec<_>>(),
        "countries": countries.join(" "),
        "pods": pods.join(" "),
        "base_models": m.base_models.iter().map(|b| json!({
            "name": b.name,
            "organization": b.organization,
            "repo_url": b.repo_url,
            "source": b.source,
            "origin": b.origin,
        })).collect::<Vec<_>>(),
        "adapter_type": m.adapter_type,
        "derived_from_run": m.derived_from_run,
    })
}

/// A model row flattened for tables and CSV (counts instead of arrays, short sha).
pub fn model_row(m: &pb::ModelSummary) -> Value {
    let mut v = model_json(m);
    v["copies"] = json!(m.copies.len());
    v["users"] = json!(m.users.len());
    v["base_models"] = json!(
        m.base_models
            .iter()
            .map(base_text)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(short) = m.sha256.get(..12) {
        v["sha256"] = json!(short);
    } else if let Some(p) = m.copies.iter().find_map(|c| c.hashing_percent) {
        // A file still being hashed: one row saying how far, not a model without a hash.
        v["sha256"] = json!(format!("hashing {p} %"));
    }
    v
}

/// RFC 3339 UTC text of a Unix millisecond time ("" for 0).
pub fn rfc3339(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return String::new();
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The columns of `sovctl nodes`, in order; the JSON objects carry at least these keys.
pub const NODE_COLUMNS: [&str; 14] = [
    "node",
    "site",
    "country",
    "last_seen",
    "reports",
    "last_seq",
    "missing",
    "dropped",
    "cpu_percent",
    "memory_percent",
    "gpus",
    "gpu_util_percent",
    "gpu_state",
    "agent_version",
];

/// One node as the JSON object `sovctl nodes --output json` prints.
pub fn node_json(n: &pb::NodeSummary) -> Value {
    let mem_pct = if n.memory_total_bytes > 0 {
        (n.memory_used_bytes as f64) * 100.0 / (n.memory_total_bytes as f64)
    } else {
        0.0
    };
    json!({
        "node": n.node,
        "site": n.site,
        "country": n.country,
        "last_seen": rfc3339(n.last_seen_unix_ms),
        "reports": n.reports,
        "last_seq": n.last_seq,
        "missing": n.missing,
        "dropped": n.dropped,
        "epoch": n.epoch,
        "cpu_percent": (f64::from(n.cpu_percent) * 10.0).round() / 10.0,
        "memory_percent": (mem_pct * 10.0).round() / 10.0,
        "agent_version": n.agent_version,
        "gpus": n.gpu_count,
        "gpu_util_percent": (f64::from(n.gpu_util_percent) * 10.0).round() / 10.0,
        "gpu_state": n.gpu_state,
        "gpu_memory_used_bytes": n.gpu_memory_used_bytes,
        "gpu_memory_total_bytes": n.gpu_memory_total_bytes,
        "memory_used_bytes": n.memory_used_bytes,
        "memory_total_bytes": n.memory_total_bytes,
        "hostname": n.hostname,
        "epochs": n.epochs,
        "conflicts": n.conflicts,
        "labels": n.labels,
    })
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => escape_controls(s),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `s` with every character that could act on a terminal or reorder what is shown written as
/// an escape, so that text from a node (a process, site, model or file name) can neither
/// hide nor forge rows: control characters (C0, DEL, C1: `\x1b`, `\n`, `\r`, `\t`, ...)
/// and the bidirectional overrides and isolates (`\u{202e}`, ...). A backslash is doubled, so
/// an escape in the output always means the character, never the text.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(needs_escape) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x100 && needs_escape(c) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Rows (JSON objects) as one pretty JSON array and a newline.
pub fn json(rows: &[Value]) -> String {
    serde_json::to_string_pretty(rows).unwrap_or_else(|_| "[]".into()) + "\n"
}

/// Rows as RFC 4180 CSV over `columns`, with a header line.
pub fn csv(rows: &[Value], columns: &[&str]) -> String {
    let mut out = columns.join(",") + "\n";
    for r in rows {
        let line: Vec<String> = columns.iter().map(|c| csv_field(&cell(&r[*c]))).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// Rows as aligned columns for people, headed by the upper-case column names.
pub fn table(rows: &[Value], columns: &[&str]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let mut out = String::new();
    let line = |vals: Vec<&str>, out: &mut String| {
        let parts: Vec<String> = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(
        columns
            .iter()
            .map(|c| c.to_uppercase())
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
        &mut out,
    );
    for r in &cells {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_bidi_overrides_from_nodes_are_escaped_in_tables_and_csv() {
        let rows = vec![serde_json::json!({
            "process": "evil\u{1b}[2J\u{1b}[1;1Hok",
            "site": "a\nnode-x  1  0\r",
            "model": "\u{202e}lmth.exe\\x1b\u{9b}",
        })];
        let cols = ["process", "site", "model"];
        for out in [table(&rows, &cols), csv(&rows, &cols)] {
            assert!(
                !out.chars()
                    .any(|c| c != '\n' && (c.is_control() || c == '\u{202e}')),
                "{out:?}"
            );
            assert_eq!(out.lines().count(), 2, "one header and one row: {out:?}");
            assert!(out.contains("evil\\x1b[2J"), "{out}");
            assert!(out.contains("a\\nnode-x"), "{out}");
            assert!(out.contains("\\u{202e}lmth.exe\\\\x1b\\x9b"), "{out}");
        }
        assert_eq!(
            escape_controls("/models/llama-3 (ok)"),
            "/models/llama-3 (ok)"
        );
    }

    #[test]
    fn the_policy_table_has_one_row_per_site_model_allow_entry_and_threshold() {
        let p = serde_json::json!({
            "file": "/etc/sovereign/policy.toml",
            "jurisdiction": "MA",
            "inside": ["MA"],
            "sites": {"paris": "FR"},
            "models": [{"match": "acme/*", "class": "restricted"}],
            "allow": [{"target": {"asn": 64500}, "reason": "cdn", "expires": null, "active": true}],
            "thresholds": {"window_secs": 300},
            "warnings": [],
        });
        let rows = policy_rows(&p);
        let find = |section: &str| rows.iter().find(|r| r["section"] == section).unwrap();
        assert_eq!(find("site")["item"], "paris");
        assert_eq!(find("model")["value"], "restricted");
        assert_eq!(find("allow")["value"], "cdn (expires never, active)");
        assert_eq!(find("threshold")["value"], "300");
        assert_eq!(rows.len(), 3 + 1 + 1 + 1 + 1);
    }

    fn sample() -> pb::NodeSummary {
        pb::NodeSummary {
            node: "node-a".into(),
            site: "rabat, dc1".into(),
            country: "MA".into(),
            last_seen_unix_ms: 1_700_000_000_000,
            reports: 10,
            last_seq: 12,
            missing: 2,
            memory_used_bytes: 1,
            memory_total_bytes: 4,
            ..Default::default()
        }
    }

    #[test]
    fn durations_take_seconds_minutes_hours_and_days() {
        assert_eq!(parse_duration_ms("7d"), Ok(7 * 86_400_000));
        assert_eq!(parse_duration_ms("90m"), Ok(90 * 60_000));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert!(
            parse_duration_ms("7w")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_duration_ms("x").is_err());
        assert!(parse_duration_ms("0h").is_err());
    }

    #[test]
    fn json_objects_carry_the_documented_keys() {
        let v = node_json(&sample());
        for k in [
            "node",
            "site",
            "country",
            "last_seen",
            "reports",
            "last_seq",
            "missing",
        ] {
            assert!(v.get(k).is_some(), "missing key {k}");
        }
        assert_eq!(v["last_seen"], "2023-11-14T22:13:20Z");
        assert_eq!(v["missing"], 2);
        assert_eq!(v["memory_percent"], 25.0);
    }

    #[test]
    fn csv_quotes_fields_with_commas_and_tables_align() {
        let rows = vec![node_json(&sample())];
        let csv = csv(&rows, &NODE_COLUMNS);
        let mut lines = csv.lines();
        assert_eq!(lines.next().unwrap(), NODE_COLUMNS.join(","));
        assert!(
            lines
                .next()
                .unwrap()
                .starts_with("node-a,\"rabat, dc1\",MA,"),
            "{csv}"
        );
        let table = table(&rows, &["node", "missing"]);
        assert_eq!(table, "NODE    MISSING\nnode-a  2\n");
    }
}

#[cfg(test)]
mod unplaced_tests {
    use super::*;

    #[test]
    fn unplaced_destinations_say_unplaced_in_tables_and_make_no_empty_scorecard_row() {
        let r = pb::EgressRow {
            bytes_sent: 5,
            ..Default::default()
        };
        assert_eq!(egress_row(&r, EgressBy::Country)["country"], "unplaced");
        assert_eq!(egress_json(&r, EgressBy::Country)["country"], "");
        let card = json!({"data": {"by_country": [
            {"country": "", "bytes_sent": 5},
            {"country": "US", "bytes_sent": 7},
        ]}});
        let rows = scorecard_rows(&card);
        assert!(
            rows.iter().all(|r| r["measure"] != "bytes_sent to "),
            "{rows:?}"
        );
        assert!(rows.iter().any(|r| r["measure"] == "bytes_sent to US"));
    }
}

#[cfg(test)]
mod destination_tests {
    use super::*;

    #[test]
    fn breach_destinations_list_each_address_once_with_every_answer_side_by_side() {
        let d = json!({
            "address": "198.18.0.2", "port": 443, "country": "FR", "operator_country": "",
            "contested": false, "physics": "impossible", "min_rtt_us": 60,
            "distance_km": 1107, "limit_km": 59,
            "answers": [
                {"source": "geofeed:t@2026-11-01", "country": "FR", "kind": "geofeed", "impossible": true, "distance_km": 1107},
                {"source": "embedded:iptocc-1.4.175", "country": "MA", "kind": "registry", "impossible": false, "distance_km": 0}
            ]
        });
        let breach = json!({"evidence": {"counters": {"destinations": [d.clone()]}}});
        let rows = breach_destinations(&[breach.clone(), breach]);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0]["answers_text"],
            "FR geofeed:t@2026-11-01 (impossible: 1107 km) | MA embedded:iptocc-1.4.175"
        );
        assert_eq!(rows[0]["min_rtt_us"], 60);
    }
}
