//! Every number of a report that the store keeps must fit where it is kept: unsigned counts,
//! sizes and byte counts at most 2^63-1 (a signed 64-bit column), shares and seconds finite
//! and not negative. A report breaking this is the sender's fault, refused as invalid with the
//! field's path, its value and the bound, never an error of the store ("retry later"), which
//! the agent would retry for ever.

use sov_proto::pb;

/// Largest unsigned value a report may carry where a signed 64-bit column keeps it.
pub const MAX_STORED: u64 = i64::MAX as u64;

/// The first out-of-range value of `report`, as a message naming its field.
pub fn check(report: &pb::Report) -> Result<(), String> {
    let mut c = Check::default();
    c.u64("interval_ms", report.interval_ms);
    if let Some(h) = &report.host {
        c.f64("host.cpu_percent", f64::from(h.cpu_percent));
        for (i, v) in h.cpu_percent_per_core.iter().enumerate() {
            c.f64(&format!("host.cpu_percent_per_core[{i}]"), f64::from(*v));
        }
        c.f64("host.load_1", h.load_1);
        c.f64("host.load_5", h.load_5);
        c.f64("host.load_15", h.load_15);
        c.u64("host.memory_total_bytes", h.memory_total_bytes);
        c.u64("host.memory_used_bytes", h.memory_used_bytes);
        c.u64("host.memory_available_bytes", h.memory_available_bytes);
        c.u64("host.swap_total_bytes", h.swap_total_bytes);
        c.u64("host.swap_used_bytes", h.swap_used_bytes);
        c.u64("host.uptime_secs", h.uptime_secs);
    }
    for (i, g) in report.gpus.iter().enumerate() {
        c.u64(&format!("gpus[{i}].memory_used_bytes"), g.memory_used_bytes);
        c.u64(
            &format!("gpus[{i}].memory_total_bytes"),
            g.memory_total_bytes,
        );
        for (j, m) in g.mig_instances.iter().enumerate() {
            let at = format!("gpus[{i}].mig_instances[{j}]");
            c.u64(&format!("{at}.memory_total_bytes"), m.memory_total_bytes);
            c.u64(&format!("{at}.memory_used_bytes"), m.memory_used_bytes);
        }
        for (j, p) in g.processes.iter().enumerate() {
            let at = format!("gpus[{i}].processes[{j}]");
            c.u64(&format!("{at}.used_memory_bytes"), p.used_memory_bytes);
            c.f64(&format!("{at}.gpu_seconds"), p.gpu_seconds);
        }
    }
    for (i, p) in report.processes.iter().enumerate() {
        c.f64(
            &format!("processes[{i}].cpu_percent"),
            f64::from(p.cpu_percent),
        );
        c.u64(&format!("processes[{i}].rss_bytes"), p.rss_bytes);
        c.u64(&format!("processes[{i}].netns_inode"), p.netns_inode);
        c.u64(&format!("processes[{i}].mntns_inode"), p.mntns_inode);
    }
    for (i, w) in report.weight_files.iter().enumerate() {
        c.u64(&format!("weight_files[{i}].size_bytes"), w.size_bytes);
        c.u64(&format!("weight_files[{i}].device"), w.device);
        c.u64(&format!("weight_files[{i}].inode"), w.inode);
        c.u64(&format!("weight_files[{i}].tensor_count"), w.tensor_count);
        c.u64(
            &format!("weight_files[{i}].parameter_count"),
            w.parameter_count,
        );
        c.u64(&format!("weight_files[{i}].mntns_inode"), w.mntns_inode);
        c.u64(
            &format!("weight_files[{i}].declared_size_bytes"),
            w.declared_size_bytes,
        );
        c.u64(
            &format!("weight_files[{i}].allocated_bytes"),
            w.allocated_bytes,
        );
    }
    for (i, f) in report.flows.iter().enumerate() {
        c.u64(&format!("flows[{i}].bytes_sent"), f.bytes_sent);
        c.u64(&format!("flows[{i}].bytes_received"), f.bytes_received);
        c.u64(&format!("flows[{i}].netns_inode"), f.netns_inode);
    }
    for (i, w) in report.withheld.iter().enumerate() {
        c.u64(&format!("withheld[{i}].count"), w.count);
        c.u64(&format!("withheld[{i}].paths_omitted"), w.paths_omitted);
        c.u64(&format!("withheld[{i}].bytes_sent"), w.bytes_sent);
        c.u64(&format!("withheld[{i}].bytes_received"), w.bytes_received);
    }
    if let Some(a) = &report.agent {
        c.u64("agent.spool_bytes", a.spool_bytes);
        c.u64("agent.spool_reports", a.spool_reports);
        c.u64("agent.dropped_reports", a.dropped_reports);
        c.u64("agent.rss_bytes", a.rss_bytes);
        c.f64("agent.cpu_percent", f64::from(a.cpu_percent));
        c.u64("agent.values_clamped", a.values_clamped);
    }
    if let Some(w) = &report.weight_inventory {
        c.u64("weight_inventory.generation", w.generation);
        c.u64("weight_inventory.total_files", w.total_files);
    }
    match c.first {
        Some(msg) => Err(msg),
        None => Ok(()),
    }
}

/// Keeps the first problem found.
#[derive(Default)]
struct Check {
    first: Option<String>,
}

impl Check {
    fn u64(&mut self, field: &str, v: u64) {
        if self.first.is_none() && v > MAX_STORED {
            self.first = Some(format!(
                "{field} is {v}, more than 2^63-1 ({MAX_STORED}); the agent clamps such values (upgrade it)"
            ));
        }
    }

    fn f64(&mut self, field: &str, v: f64) {
        if self.first.is_none() && !(v.is_finite() && v >= 0.0) {
            self.first = Some(format!(
                "{field} is {v}, not a finite number >= 0; the agent clamps such values (upgrade it)"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_above_a_signed_64_bit_column_and_non_finite_shares_are_named() {
        let mut r = pb::Report {
            weight_files: vec![pb::WeightFile::default(), pb::WeightFile::default()],
            ..Default::default()
        };
        assert!(check(&r).is_ok());
        r.weight_files[1].parameter_count = u64::MAX;
        let msg = check(&r).unwrap_err();
        assert!(msg.contains("weight_files[1].parameter_count"), "{msg}");
        assert!(msg.contains("18446744073709551615"), "{msg}");
        r.weight_files[1].parameter_count = MAX_STORED;
        assert!(check(&r).is_ok());
        r.host = Some(pb::HostSample {
            cpu_percent: f32::NAN,
            ..Default::default()
        });
        assert!(check(&r).unwrap_err().contains("host.cpu_percent is NaN"));
        r.host.as_mut().unwrap().cpu_percent = f32::INFINITY;
        assert!(check(&r).unwrap_err().contains("host.cpu_percent is inf"));
        r.host = None;
        r.flows = vec![pb::Flow {
            bytes_sent: MAX_STORED + 1,
            ..Default::default()
        }];
        assert!(check(&r).unwrap_err().contains("flows[0].bytes_sent"));
    }
}
