//! What every report the agent builds satisfies, whatever the node's files and processes hold:
//! the wire contract a collector can store without a second thought.
//!
//! - Every integer fits a signed 64-bit column (≤ 2^63-1): a pickle that declares more
//!   elements than that, a file or byte counter the kernel reports above it, is clamped and the
//!   clamp named (in the weight file's `error`, and counted in `AgentStats.values_clamped`).
//! - Every float is finite and within its range (CPU and utilisation shares 0-100, or
//!   0-100 × CPUs per process; load averages and GPU-seconds ≥ 0): NaN and infinities become 0.
//! - Every weight file fits [`MAX_FILE_REPORT_BYTES`] encoded: metadata is kept up to
//!   [`MAX_FILE_METADATA_BYTES`], and aliases, users, dtypes and refs up to their own bounds; what
//!   was cut is named in `error`. So no single file, however hostile its header, can make a
//!   report too large, and [`crate::shape`] can pack files into reports by size.
//!
//! The values are also checked where they are made (the parsers saturate, the host and process
//! samplers drop non-finite shares); this module is the single place that guarantees the
//! contract for the report as a whole, just before it is spooled.

use sov_proto::pb;

/// Largest encoded size of one weight file in a report.
pub const MAX_FILE_REPORT_BYTES: usize = 64 * 1024;
/// Metadata bytes (keys and values) kept per weight file.
pub const MAX_FILE_METADATA_BYTES: usize = 16 * 1024;
/// Other paths to the same file kept per weight file.
pub const MAX_ALIASES: usize = 64;
/// Users (processes) kept per weight file.
pub const MAX_USERS_PER_FILE: usize = 256;
/// Dtypes and refs kept per weight file.
pub const MAX_SMALL_LIST: usize = 64;
/// Longest string kept in a weight file's text fields (a Linux path is at most 4096 bytes).
pub const MAX_TEXT_BYTES: usize = 4096;
/// Longest `error` text on a weight file.
pub const MAX_ERROR_BYTES: usize = 2048;

/// The largest value a collector's signed 64-bit column holds.
const I64_MAX: u64 = i64::MAX as u64;

/// Clamps what the report carries to the wire contract (see the module doc) and bounds every
/// weight file. Returns how many values were clamped or cut.
pub fn clamp_report(r: &mut pb::Report) -> u64 {
    let mut n = 0;
    n += u64s(&mut [&mut r.epoch, &mut r.seq, &mut r.interval_ms]);
    if let Some(h) = r.host.as_mut() {
        n += clamp_host(h);
    }
    let cpus = r
        .node_info
        .as_ref()
        .map_or(0, |i| i.cpu_count)
        .max(
            u32::try_from(r.host.as_ref().map_or(0, |h| h.cpu_percent_per_core.len()))
                .unwrap_or(u32::MAX),
        )
        .max(1);
    for g in &mut r.gpus {
        n += u64s(&mut [&mut g.memory_used_bytes, &mut g.memory_total_bytes]);
        for m in &mut g.mig_instances {
            n += u64s(&mut [&mut m.memory_total_bytes, &mut m.memory_used_bytes]);
        }
        for p in &mut g.processes {
            n += u64s(&mut [&mut p.used_memory_bytes]);
            n += f64_at_least_zero(&mut p.gpu_seconds);
        }
    }
    for p in &mut r.processes {
        n += u64s(&mut [&mut p.rss_bytes]);
        n += f32_in(&mut p.cpu_percent, 100.0 * cpus as f32);
    }
    for f in &mut r.weight_files {
        n += bound_weight_file(f);
    }
    for f in &mut r.flows {
        n += u64s(&mut [&mut f.bytes_sent, &mut f.bytes_received]);
    }
    if let Some(a) = r.agent.as_mut() {
        n += u64s(&mut [
            &mut a.spool_bytes,
            &mut a.spool_reports,
            &mut a.dropped_reports,
            &mut a.rss_bytes,
        ]);
        n += f32_in(&mut a.cpu_percent, 100.0 * cpus as f32);
        a.values_clamped = a.values_clamped.saturating_add(n).min(I64_MAX);
    }
    n
}

/// The host sample's counters and shares.
pub fn clamp_host(h: &mut pb::HostSample) -> u64 {
    let mut n = u64s(&mut [
        &mut h.memory_total_bytes,
        &mut h.memory_used_bytes,
        &mut h.memory_available_bytes,
        &mut h.swap_total_bytes,
        &mut h.swap_used_bytes,
        &mut h.uptime_secs,
    ]);
    n += f32_in(&mut h.cpu_percent, 100.0);
    for c in &mut h.cpu_percent_per_core {
        n += f32_in(c, 100.0);
    }
    for l in [&mut h.load_1, &mut h.load_5, &mut h.load_15] {
        n += f64_at_least_zero(l);
    }
    n
}

/// Clamps one weight file's numbers and cuts its lists and texts so that it encodes to at most
/// [`MAX_FILE_REPORT_BYTES`]; every change is named in `error`. Returns how many values
/// changed.
pub fn bound_weight_file(f: &mut pb::WeightFile) -> u64 {
    let mut notes: Vec<String> = Vec::new();
    let mut n = 0;
    for (name, v) in [
        ("size_bytes", &mut f.size_bytes),
        ("tensor_count", &mut f.tensor_count),
        ("parameter_count", &mut f.parameter_count),
        ("allocated_bytes", &mut f.allocated_bytes),
    ] {
        if *v > I64_MAX {
            notes.push(format!("{name} {v} exceeds 2^63-1; clamped"));
            *v = I64_MAX;
            n += 1;
        }
    }
    if let Some(p) = f.hashing_percent.as_mut().filter(|p| **p > 99) {
        *p = 99;
    }
    let cut_text = |s: &mut String, name: &str, notes: &mut Vec<String>| -> u64 {
        if s.len() <= MAX_TEXT_BYTES {
            return 0;
        }
        notes.push(format!("{name} cut to {MAX_TEXT_BYTES} bytes"));
        truncate(s, MAX_TEXT_BYTES);
        1
    };
    n += cut_text(&mut f.path, "path", &mut notes);
    n += cut_text(&mut f.shard_set, "shard_set", &mut notes);
    if let Some(id) = f.identity.as_mut() {
        for (name, s) in [
            ("identity.model", &mut id.model),
            ("identity.revision", &mut id.revision),
            ("identity.repo_path", &mut id.repo_path),
            ("identity.source", &mut id.source),
            ("identity.publisher", &mut id.publisher),
        ] {
            n += cut_text(s, name, &mut notes);
        }
        n += cap_list(&mut id.refs, MAX_SMALL_LIST, "identity.refs", &mut notes);
        for r in &mut id.refs {
            truncate(r, MAX_TEXT_BYTES);
        }
    }
    if let Some(st) = f.storage.as_mut() {
        for (name, s) in [
            ("storage.mount_point", &mut st.mount_point),
            ("storage.fs_type", &mut st.fs_type),
            ("storage.source", &mut st.source),
            ("storage.server_address", &mut st.server_address),
        ] {
            n += cut_text(s, name, &mut notes);
        }
    }
    n += cap_list(&mut f.dtypes, MAX_SMALL_LIST, "dtypes", &mut notes);
    n += cap_list(&mut f.aliases, MAX_ALIASES, "aliases", &mut notes);
    for a in &mut f.aliases {
        truncate(a, MAX_TEXT_BYTES);
    }
    n += cap_list(&mut f.users, MAX_USERS_PER_FILE, "users", &mut notes);
    for u in &mut f.users {
        truncate(&mut u.process, 256);
        u.gpu_uuids.truncate(MAX_SMALL_LIST);
    }
    f.open_by_pids.truncate(MAX_USERS_PER_FILE);
    n += cap_metadata(&mut f.metadata, &mut notes);
    // Whatever is still too large (a file with many long aliases, say) loses the optional lists
    // from the least to the most useful until it fits.
    let mut pass = 0;
    while prost::Message::encoded_len(f) + notes_len(&notes) > MAX_FILE_REPORT_BYTES && pass < 64 {
        pass += 1;
        if !f.aliases.is_empty() {
            let keep = f.aliases.len() / 2;
            n += cap_list(&mut f.aliases, keep, "aliases", &mut notes);
        } else if !f.metadata.is_empty() {
            let keep = f.metadata.len() / 2;
            let mut keys: Vec<String> = f.metadata.keys().cloned().collect();
            keys.sort();
            for k in keys.into_iter().skip(keep) {
                f.metadata.remove(&k);
            }
            notes.push(format!(
                "metadata cut to {keep} entries to fit {MAX_FILE_REPORT_BYTES} bytes"
            ));
            n += 1;
        } else if !f.users.is_empty() {
            let keep = f.users.len() / 2;
            n += cap_list(&mut f.users, keep, "users", &mut notes);
            f.open_by_pids.truncate(keep);
        } else if !f.dtypes.is_empty() {
            f.dtypes.clear();
            notes.push("dtypes dropped to fit".to_owned());
            n += 1;
        } else {
            break;
        }
    }
    if !notes.is_empty() {
        let mut error = std::mem::take(&mut f.error);
        for note in notes {
            if !error.is_empty() {
                error.push_str("; ");
            }
            error.push_str(&note);
        }
        truncate(&mut error, MAX_ERROR_BYTES);
        f.error = error;
    }
    n
}

fn notes_len(notes: &[String]) -> usize {
    notes
        .iter()
        .map(|s| s.len() + 2)
        .sum::<usize>()
        .min(MAX_ERROR_BYTES)
}

/// Keeps metadata entries, in key order, while their bytes fit [`MAX_FILE_METADATA_BYTES`].
fn cap_metadata(
    meta: &mut std::collections::HashMap<String, String>,
    notes: &mut Vec<String>,
) -> u64 {
    let total: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total <= MAX_FILE_METADATA_BYTES {
        return 0;
    }
    let mut keys: Vec<String> = meta.keys().cloned().collect();
    keys.sort();
    let (before, mut used) = (keys.len(), 0usize);
    let mut kept = 0usize;
    for k in keys {
        let len = k.len() + meta.get(&k).map_or(0, String::len);
        if used + len <= MAX_FILE_METADATA_BYTES {
            used += len;
            kept += 1;
        } else {
            meta.remove(&k);
        }
    }
    notes.push(format!(
        "metadata cut: {kept} of {before} entries kept ({MAX_FILE_METADATA_BYTES} bytes per file)"
    ));
    1
}

fn cap_list<T>(list: &mut Vec<T>, max: usize, name: &str, notes: &mut Vec<String>) -> u64 {
    if list.len() <= max {
        return 0;
    }
    notes.push(format!("{name}: {max} of {} kept", list.len()));
    list.truncate(max);
    1
}

fn u64s(values: &mut [&mut u64]) -> u64 {
    let mut n = 0;
    for v in values.iter_mut() {
        if **v > I64_MAX {
            **v = I64_MAX;
            n += 1;
        }
    }
    n
}

/// NaN or infinite → 0; negative → 0; above `max` → `max`. 1 when the value changed.
fn f32_in(v: &mut f32, max: f32) -> u64 {
    let fixed = if !v.is_finite() {
        0.0
    } else {
        v.clamp(0.0, max)
    };
    // Bitwise, so that NaN (never equal to itself) counts as changed and -0.0 does not.
    let changed = fixed.to_bits() != v.to_bits() && !(fixed == 0.0 && *v == 0.0);
    *v = fixed;
    u64::from(changed)
}

fn f64_at_least_zero(v: &mut f64) -> u64 {
    let fixed = if !v.is_finite() { 0.0 } else { v.max(0.0) };
    let changed = fixed.to_bits() != v.to_bits() && !(fixed == 0.0 && *v == 0.0);
    *v = fixed;
    u64::from(changed)
}

/// Cuts `s` to at most `max` bytes at a character boundary.
pub fn truncate(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn integers_above_i64_and_non_finite_shares_are_clamped_and_counted() {
        let mut r = pb::Report {
            host: Some(pb::HostSample {
                cpu_percent: f32::NAN,
                cpu_percent_per_core: vec![f32::INFINITY, 50.0, -3.0, 250.0],
                load_1: f64::NAN,
                memory_total_bytes: u64::MAX,
                ..Default::default()
            }),
            processes: vec![pb::ProcessInfo {
                cpu_percent: f32::NEG_INFINITY,
                rss_bytes: u64::MAX,
                ..Default::default()
            }],
            flows: vec![pb::Flow {
                bytes_sent: 1 << 63,
                bytes_received: 7,
                ..Default::default()
            }],
            weight_files: vec![pb::WeightFile {
                parameter_count: u64::MAX - 1,
                ..Default::default()
            }],
            agent: Some(pb::AgentStats::default()),
            ..Default::default()
        };
        let n = clamp_report(&mut r);
        let h = r.host.as_ref().unwrap();
        assert_eq!(h.cpu_percent, 0.0);
        assert_eq!(h.cpu_percent_per_core, [0.0, 50.0, 0.0, 100.0]);
        assert_eq!(h.load_1, 0.0);
        assert_eq!(h.memory_total_bytes, I64_MAX);
        assert_eq!(r.processes[0].cpu_percent, 0.0);
        assert_eq!(r.processes[0].rss_bytes, I64_MAX);
        assert_eq!(r.flows[0].bytes_sent, I64_MAX);
        assert_eq!(r.flows[0].bytes_received, 7);
        let f = &r.weight_files[0];
        assert_eq!(f.parameter_count, I64_MAX);
        assert!(
            f.error
                .contains("parameter_count 18446744073709551614 exceeds 2^63-1"),
            "{}",
            f.error
        );
        assert_eq!(n, 10);
        assert_eq!(r.agent.unwrap().values_clamped, 10);
    }

    #[test]
    fn values_within_the_contract_are_left_alone() {
        let mut r = pb::Report {
            host: Some(pb::HostSample {
                cpu_percent: 12.5,
                cpu_percent_per_core: vec![0.0, 100.0],
                load_1: 3.5,
                memory_total_bytes: I64_MAX,
                ..Default::default()
            }),
            processes: vec![pb::ProcessInfo {
                cpu_percent: 180.0, // two CPUs busy
                ..Default::default()
            }],
            ..Default::default()
        };
        let before = r.clone();
        assert_eq!(clamp_report(&mut r), 0);
        assert_eq!(r, before);
    }

    #[test]
    fn a_weight_file_with_the_largest_metadata_a_parser_allows_fits_the_per_file_bound() {
        // 256 entries of a 256-byte key and a 4096-byte value: what the parsers keep at most.
        let metadata = (0..256)
            .map(|i| (format!("{i:0>256}"), "v".repeat(4096)))
            .collect();
        let mut f = pb::WeightFile {
            path: "/models/x.safetensors".into(),
            metadata,
            aliases: (0..10_000).map(|i| format!("/a/{i:0>4000}")).collect(),
            users: (0..5000)
                .map(|pid| pb::WeightUser {
                    pid,
                    process: "p".repeat(100),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        assert!(f.encoded_len() > 20 * MAX_FILE_REPORT_BYTES);
        let n = bound_weight_file(&mut f);
        assert!(n >= 3, "{n}");
        assert!(
            f.encoded_len() <= MAX_FILE_REPORT_BYTES,
            "{} bytes",
            f.encoded_len()
        );
        assert!(f.error.contains("metadata cut"), "{}", f.error);
        assert!(f.error.contains("aliases"), "{}", f.error);
        assert_eq!(f.path, "/models/x.safetensors", "identity kept");
        assert!(!f.metadata.is_empty(), "some metadata kept");
    }

    #[test]
    fn truncation_respects_character_boundaries() {
        let mut s = "é".repeat(10); // 2 bytes each
        truncate(&mut s, 5);
        assert_eq!(s, "éé");
    }
}
