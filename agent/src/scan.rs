//! `sov-agent scan`: one snapshot of everything the agent can see now, without a collector,
//! as a readable table or as one JSON object (`--json`).
//!
//! The JSON keys are an interface other tools rely on: `host.logical_cpus`,
//! `host.cpu_percent`, `host.memory_total_bytes`, `host.memory_used_bytes`, `gpu.state`
//! (`ok` or `unavailable`), `gpu.reason`, `gpu.devices`, `processes` (objects with `pid`,
//! `name`, `exe`, `cpu_percent`, `rss_bytes`, `container`), `weights` (objects with `path`,
//! `container_path`, `host_path_known`, `found_by`, `container`, `sha256`, `incomplete`,
//! `shard`, `users`, …), `flows` (the traffic during the window, with `pid`, `netns_inode`,
//! `container`) and `net`. A `container` is null for a host process, else an object with
//! `runtime`, `id`, `name`, `image`, `image_digest`, `pod_name`, `pod_namespace`, `pod_uid`,
//! `container_name` and `source` (`runtime`, or `cgroup` when no runtime answered).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sov_proto::pb;

use crate::observe::{Observation, Observer};

/// How long scan waits between its two observations (CPU shares are differences).
pub const DEFAULT_SCAN_WINDOW: Duration = Duration::from_millis(1000);

/// A container reference as `scan --json` prints it (null for none).
pub fn container_json(c: Option<&pb::ContainerRef>) -> Value {
    match c {
        None => Value::Null,
        Some(c) => json!({
            "runtime": c.runtime,
            "runtime_namespace": c.runtime_namespace,
            "id": c.id,
            "name": c.name,
            "image": c.image,
            "image_digest": c.image_digest,
            "pod_name": c.pod_name,
            "pod_namespace": c.pod_namespace,
            "pod_uid": c.pod_uid,
            "container_name": c.container_name,
            "source": c.source,
        }),
    }
}

/// A flow as `scan --json` prints it.
pub fn flow_json(f: &pb::Flow) -> Value {
    json!({
        "protocol": if f.protocol == pb::Protocol::Udp as i32 { "udp" } else { "tcp" },
        "direction": if f.direction == pb::Direction::Inbound as i32 { "inbound" } else { "outbound" },
        "local_address": f.local_address,
        "local_port": f.local_port,
        "remote_address": f.remote_address,
        "remote_port": f.remote_port,
        "pid": f.pid,
        "owner_unknown": f.owner_unknown,
        "bytes_sent": f.bytes_sent,
        "bytes_received": f.bytes_received,
        "bytes_known": f.bytes_known,
        "connections": f.connections,
        "netns_inode": f.netns_inode,
        "container": container_json(f.container.as_ref()),
    })
}

/// A weight file as `scan --json` prints it.
pub fn weight_json(w: &pb::WeightFile) -> Value {
    let id = w.identity.clone().unwrap_or_default();
    let st = w.storage.clone().unwrap_or_default();
    let format = match pb::WeightFormat::try_from(w.format) {
        Ok(pb::WeightFormat::Safetensors) => "safetensors",
        Ok(pb::WeightFormat::Gguf) => "gguf",
        Ok(pb::WeightFormat::PytorchZip) => "pytorch",
        Ok(pb::WeightFormat::Torchscript) => "torchscript",
        Ok(pb::WeightFormat::Pickle) => "pickle",
        Ok(pb::WeightFormat::Onnx) => "onnx",
        _ => "unknown",
    };
    json!({
        "path": w.path,
        "container_path": w.container_path,
        "host_path_known": w.host_path_known,
        "found_by": w.found_by,
        "container": container_json(w.container.as_ref()),
        "mntns_inode": w.mntns_inode,
        "incomplete": w.incomplete,
        "declared_size": (w.declared_size_bytes > 0).then_some(w.declared_size_bytes),
        "format": format,
        "model": id.model,
        "revision": id.revision,
        "refs": id.refs,
        "repo_path": id.repo_path,
        "identity_source": id.source,
        "publisher": id.publisher,
        "sha256": if w.sha256.is_empty() { Value::Null } else { json!(w.sha256) },
        "size": w.size_bytes,
        "params": (w.parameter_count > 0).then_some(w.parameter_count),
        "tensors": w.tensor_count,
        "dtypes": w.dtypes,
        "storage": if st.network { st.fs_type.clone() } else { "local".to_owned() },
        "fs_type": st.fs_type,
        "mount_point": st.mount_point,
        "server": st.server_address,
        "shard": (w.shard_count > 0).then(|| json!({"index": w.shard_index, "count": w.shard_count, "set": w.shard_set})),
        "aliases": w.aliases,
        "metadata": w.metadata,
        "users": w.users.iter().map(|u| json!({
            "pid": u.pid,
            "process": u.process,
            "gpus": u.gpu_uuids,
            "mapped": u.mapped,
            "open": u.open,
            "container": container_json(u.container.as_deref()),
        })).collect::<Vec<_>>(),
    })
}

/// Observe twice, `window` apart, and return the second observation with the node facts.
pub fn snapshot(observer: &mut Observer, window: Duration) -> (Observation, pb::NodeInfo) {
    let mut info = pb::NodeInfo {
        hostname: crate::config::local_hostname(),
        agent_version: crate::run::AGENT_VERSION.to_owned(),
        ..Default::default()
    };
    observer.node_facts(&mut info);
    let _baseline = observer.observe(Instant::now());
    std::thread::sleep(window);
    (observer.observe(Instant::now()), info)
}

fn reason_name(r: i32) -> &'static str {
    match pb::ProcessReason::try_from(r) {
        Ok(pb::ProcessReason::TopCpu) => "top_cpu",
        Ok(pb::ProcessReason::TopMemory) => "top_memory",
        Ok(pb::ProcessReason::Gpu) => "gpu",
        Ok(pb::ProcessReason::Weights) => "weights",
        Ok(pb::ProcessReason::Flow) => "flow",
        _ => "unspecified",
    }
}

/// `ok` when NVML answered (with or without devices), else `unavailable`.
pub fn gpu_state_name(state: &pb::GpuState) -> &'static str {
    match pb::gpu_state::Availability::try_from(state.availability) {
        Ok(pb::gpu_state::Availability::Available | pb::gpu_state::Availability::NoDevices) => "ok",
        _ => "unavailable",
    }
}

fn round1(v: f32) -> f64 {
    (f64::from(v) * 10.0).round() / 10.0
}

/// The snapshot as the documented JSON object, with the weight files found.
pub fn to_json_with_weights(
    obs: &Observation,
    info: &pb::NodeInfo,
    weights: &[pb::WeightFile],
    errors: &[(String, String)],
) -> Value {
    let mut v = to_json(obs, info);
    v["weights"] = Value::Array(weights.iter().map(weight_json).collect());
    v["weight_errors"] = Value::Array(
        errors
            .iter()
            .map(|(p, e)| json!({"path": p, "error": e}))
            .collect(),
    );
    v
}

/// The flows of the window and the state of flow observation, added to a snapshot's JSON.
pub fn add_flows(v: &mut Value, flows: &[pb::Flow], status: &crate::collect::net::NetStatus) {
    v["flows"] = Value::Array(flows.iter().map(flow_json).collect());
    v["net"] = json!({
        "mode": status.mode,
        "reason": status.reason,
        "sockets": status.sockets,
        "namespaces": status.namespaces,
        "namespaces_fallback": status.namespaces_fallback,
        "destroy_events": status.destroy_events,
        "short_connections": status.short_connections,
        "short_unknown_owners": status.short_unknown_owners,
    });
}

/// The weight files as text for people.
pub fn weights_table(weights: &[pb::WeightFile], errors: &[(String, String)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "WEIGHTS ({} files)", weights.len());
    for w in weights {
        let j = weight_json(w);
        let sha = w.sha256.get(..12).unwrap_or("-");
        let users: Vec<String> = w
            .users
            .iter()
            .map(|u| format!("{}({})", u.process, u.pid))
            .collect();
        let _ = writeln!(
            out,
            "  {:<40} {:<11} {:>10} {:<12} {:<8} {}{}",
            j["model"].as_str().unwrap_or(""),
            j["format"].as_str().unwrap_or(""),
            human_bytes(w.size_bytes),
            sha,
            j["storage"].as_str().unwrap_or(""),
            w.path,
            if users.is_empty() {
                String::new()
            } else {
                format!("  used by {}", users.join(", "))
            }
        );
    }
    for (p, e) in errors {
        let _ = writeln!(out, "  REFUSED {p}: {e}");
    }
    out
}

/// The snapshot as the documented JSON object.
pub fn to_json(obs: &Observation, info: &pb::NodeInfo) -> Value {
    let h = &obs.host;
    let devices: Vec<Value> = obs
        .gpu
        .devices
        .iter()
        .map(|d| {
            json!({
                "index": d.index,
                "uuid": d.uuid,
                "name": d.name,
                "pci_bus_id": d.pci_bus_id,
                "utilization_gpu_percent": d.utilization_gpu_percent,
                "utilization_memory_percent": d.utilization_memory_percent,
                "memory_used_bytes": d.memory_used_bytes,
                "memory_total_bytes": d.memory_total_bytes,
                "power_draw_milliwatts": d.power_draw_milliwatts,
                "power_limit_milliwatts": d.power_limit_milliwatts,
                "temperature_celsius": d.temperature_celsius,
                "mig_enabled": d.mig_enabled,
                "mig_instances": d.mig_instances.iter().map(|m| json!({
                    "uuid": m.uuid,
                    "gpu_instance_id": m.gpu_instance_id,
                    "compute_instance_id": m.compute_instance_id,
                    "memory_used_bytes": m.memory_used_bytes,
                    "memory_total_bytes": m.memory_total_bytes,
                })).collect::<Vec<_>>(),
                "processes": d.processes.iter().map(|p| json!({
                    "pid": p.pid,
                    "used_memory_bytes": p.used_memory_bytes,
                    "sm_percent": p.sm_percent,
                    "gpu_seconds": p.gpu_seconds,
                    "kind": p.kind,
                    "mig_uuid": p.mig_uuid,
                    "container": container_json(p.container.as_ref()),
                })).collect::<Vec<_>>(),
                "error": d.error,
            })
        })
        .collect();
    let processes: Vec<Value> = obs
        .processes
        .processes
        .iter()
        .map(|p| {
            json!({
                "pid": p.pid,
                "parent_pid": p.parent_pid,
                "name": p.name,
                "exe": p.exe,
                "cmdline": p.cmdline,
                "user": p.user,
                "start_time_unix_ms": p.start_time_unix_ms,
                "cgroup": p.cgroup,
                "container_id": p.container_id,
                "container": container_json(p.container.as_deref()),
                "netns_inode": p.netns_inode,
                "mntns_inode": p.mntns_inode,
                "cpu_percent": round1(p.cpu_percent),
                "rss_bytes": p.rss_bytes,
                "reasons": p.reasons.iter().map(|r| reason_name(*r)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "node": {
            "hostname": info.hostname,
            "os": info.os,
            "kernel": info.kernel,
            "boot_time_unix_ms": info.boot_time_unix_ms,
            "cpu_brand": info.cpu_brand,
            "agent_version": info.agent_version,
        },
        "host": {
            "logical_cpus": h.cpu_percent_per_core.len(),
            "cpu_percent": round1(h.cpu_percent),
            "cpu_percent_per_core": h.cpu_percent_per_core.iter().map(|c| round1(*c)).collect::<Vec<_>>(),
            "load_1": h.load_1,
            "load_5": h.load_5,
            "load_15": h.load_15,
            "memory_total_bytes": h.memory_total_bytes,
            "memory_used_bytes": h.memory_used_bytes,
            "memory_available_bytes": h.memory_available_bytes,
            "swap_total_bytes": h.swap_total_bytes,
            "swap_used_bytes": h.swap_used_bytes,
            "uptime_secs": h.uptime_secs,
            "process_count": h.process_count,
        },
        "gpu": {
            "state": gpu_state_name(&obs.gpu.state),
            "reason": obs.gpu.state.reason,
            "driver_version": obs.gpu.state.driver_version,
            "devices": devices,
        },
        "processes": processes,
        "agent": {
            "rss_bytes": obs.budget.rss_bytes,
            "cpu_percent": round1(obs.budget.cpu_percent),
            "over_budget": !obs.budget.over.is_empty(),
            "budget_reason": obs.budget.over.join(", "),
        },
    })
}

/// Bytes as a short human figure (binary units).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// The snapshot as text for people.
pub fn to_table(obs: &Observation, info: &pb::NodeInfo) -> String {
    let h = &obs.host;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "HOST    {}  {}  kernel {}  up {}h",
        info.hostname,
        info.os,
        info.kernel,
        h.uptime_secs / 3600
    );
    let cores: Vec<String> = h
        .cpu_percent_per_core
        .iter()
        .map(|c| format!("{c:.0}"))
        .collect();
    let _ = writeln!(
        out,
        "CPU     {} logical, {:.1}% busy (per core: {})  load {:.2} {:.2} {:.2}",
        h.cpu_percent_per_core.len(),
        h.cpu_percent,
        cores.join(" "),
        h.load_1,
        h.load_5,
        h.load_15
    );
    let _ = writeln!(
        out,
        "MEMORY  {} used of {}, swap {} of {}",
        human_bytes(h.memory_used_bytes),
        human_bytes(h.memory_total_bytes),
        human_bytes(h.swap_used_bytes),
        human_bytes(h.swap_total_bytes)
    );
    let state = gpu_state_name(&obs.gpu.state);
    if state == "unavailable" {
        let _ = writeln!(out, "GPU     unavailable: {}", obs.gpu.state.reason);
    } else if obs.gpu.devices.is_empty() {
        let _ = writeln!(
            out,
            "GPU     NVML ok (driver {}), no device",
            obs.gpu.state.driver_version
        );
    } else {
        let _ = writeln!(out, "GPU     driver {}", obs.gpu.state.driver_version);
        let _ = writeln!(
            out,
            "  {:<3} {:<28} {:>5} {:>5} {:>21} {:>9} {:>5} {:<4} {:>5}",
            "IDX", "NAME", "UTIL%", "MEM%", "MEMORY", "POWER W", "TEMP", "MIG", "PROCS"
        );
        for d in &obs.gpu.devices {
            let _ = writeln!(
                out,
                "  {:<3} {:<28} {:>5} {:>5} {:>21} {:>9} {:>5} {:<4} {:>5}{}",
                d.index,
                d.name,
                d.utilization_gpu_percent,
                d.utilization_memory_percent,
                format!(
                    "{} / {}",
                    human_bytes(d.memory_used_bytes),
                    human_bytes(d.memory_total_bytes)
                ),
                format!(
                    "{:.0}/{:.0}",
                    f64::from(d.power_draw_milliwatts) / 1000.0,
                    f64::from(d.power_limit_milliwatts) / 1000.0
                ),
                d.temperature_celsius,
                if d.mig_enabled { "on" } else { "off" },
                d.processes.len(),
                if d.error.is_empty() {
                    String::new()
                } else {
                    format!("  ERROR: {}", d.error)
                }
            );
            for p in &d.processes {
                let sm = p
                    .sm_percent
                    .map_or_else(|| "-".to_owned(), |s| format!("{s}%"));
                let _ = writeln!(
                    out,
                    "      pid {:<8} {:>10} sm {:>4} {}",
                    p.pid,
                    human_bytes(p.used_memory_bytes),
                    sm,
                    p.kind
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "PROCESSES ({} selected of {})",
        obs.processes.processes.len(),
        obs.processes.total
    );
    let _ = writeln!(
        out,
        "  {:>8} {:<12} {:<20} {:>6} {:>10} {:<12} EXE",
        "PID", "USER", "NAME", "CPU%", "RSS", "CONTAINER"
    );
    let mut procs: Vec<&pb::ProcessInfo> = obs.processes.processes.iter().collect();
    procs.sort_by(|a, b| {
        b.cpu_percent
            .total_cmp(&a.cpu_percent)
            .then(b.rss_bytes.cmp(&a.rss_bytes))
    });
    for p in procs {
        let container: String = p.container_id.chars().take(12).collect();
        let _ = writeln!(
            out,
            "  {:>8} {:<12} {:<20} {:>6.1} {:>10} {:<12} {}",
            p.pid,
            p.user,
            p.name,
            p.cpu_percent,
            human_bytes(p.rss_bytes),
            container,
            p.exe
        );
    }
    let _ = writeln!(
        out,
        "AGENT   rss {}, cpu {:.1}%{}",
        human_bytes(obs.budget.rss_bytes),
        obs.budget.cpu_percent,
        if obs.budget.over.is_empty() {
            String::new()
        } else {
            format!(", OVER BUDGET: {}", obs.budget.over.join(", "))
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::gpu::GpuCollector;
    use crate::collect::gpu::fake::{ScriptedProbe, device, process};
    use crate::config::{BudgetConfig, ProcessesConfig};

    fn observer(gpu: Option<GpuCollector>) -> Observer {
        Observer::with_settings(&ProcessesConfig::default(), &BudgetConfig::default(), gpu)
    }

    #[test]
    fn the_json_snapshot_has_the_documented_keys_and_this_machines_facts() {
        let probe = ScriptedProbe::new().then_ok(vec![
            device(0).with_process(process(std::process::id(), 1 << 30).sm(40)),
            device(1),
        ]);
        let mut o = observer(Some(GpuCollector::with_probe(Box::new(probe))));
        let (obs, info) = snapshot(&mut o, Duration::from_millis(200));
        let v = to_json(&obs, &info);
        assert!(v["host"]["logical_cpus"].as_u64().unwrap() >= 1);
        assert!(v["host"]["memory_total_bytes"].as_u64().unwrap() > 0);
        assert!(v["host"]["memory_used_bytes"].is_u64());
        assert!(v["host"]["cpu_percent"].is_f64());
        assert_eq!(v["gpu"]["state"], "ok");
        assert_eq!(v["gpu"]["devices"].as_array().unwrap().len(), 2);
        assert_eq!(v["gpu"]["devices"][0]["processes"][0]["sm_percent"], 40);
        // The GPU user (this test process) is among the processes, marked as such.
        let me = v["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"] == std::process::id())
            .expect("GPU process listed");
        assert!(
            me["reasons"].as_array().unwrap().contains(&json!("gpu")),
            "{me}"
        );
        for k in ["pid", "name", "exe", "cpu_percent", "rss_bytes"] {
            assert!(me.get(k).is_some(), "process key {k}");
        }
        let table = to_table(&obs, &info);
        assert!(table.contains("GPU     driver"), "{table}");
        assert!(
            table.contains(&format!("pid {}", std::process::id())),
            "{table}"
        );
    }

    #[test]
    fn disabled_gpus_are_unavailable_with_the_reason() {
        let mut o = observer(None);
        let (obs, info) = snapshot(&mut o, Duration::from_millis(10));
        let v = to_json(&obs, &info);
        assert_eq!(v["gpu"]["state"], "unavailable");
        assert!(
            v["gpu"]["reason"].as_str().unwrap().contains("disabled"),
            "{v}"
        );
        assert!(to_table(&obs, &info).contains("GPU     unavailable: GPU observation disabled"));
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(80 << 30), "80.0 GiB");
    }
}
