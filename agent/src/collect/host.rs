//! Host sample: CPU total and per core, memory, swap, load averages, uptime, and the node facts
//! that go into `NodeInfo` (OS, kernel, boot time, CPU brand).

use sov_proto::pb;
use sysinfo::System;

/// Reads host facts through sysinfo. Keep one per agent: CPU usage is a difference between two
/// refreshes, so the first sample after creation reads the usage since creation.
#[derive(Debug)]
pub struct HostCollector {
    sys: Option<System>,
    /// The number of processes for the next sample, when the caller knows it (the shared
    /// process table); else `/proc` is listed (about 1 µs per process).
    process_count: Option<u32>,
}

impl Default for HostCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl HostCollector {
    /// A collector; the first CPU refresh happens here so the first sample has a baseline.
    pub fn new() -> Self {
        let sys = match System::new() {
            Ok(mut s) => {
                s.refresh_cpu_usage();
                Some(s)
            }
            Err(err) => {
                tracing::warn!(error = %err, "host metrics unavailable; reports will carry an empty host sample");
                None
            }
        };
        Self {
            sys,
            process_count: None,
        }
    }

    /// The next sample's process count is `n` (known from the process table): `/proc` is not
    /// listed for it.
    pub fn set_process_count(&mut self, n: usize) {
        self.process_count = Some(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// One host sample: usage since the previous call.
    pub fn sample(&mut self) -> pb::HostSample {
        let mut out = pb::HostSample::default();
        if let Ok(load) = System::load_average() {
            out.load_1 = load.one;
            out.load_5 = load.five;
            out.load_15 = load.fifteen;
        }
        out.uptime_secs = System::uptime().unwrap_or(0);
        let Some(sys) = self.sys.as_mut() else {
            return out;
        };
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        out.cpu_percent = sys.global_cpu_usage();
        out.cpu_percent_per_core = sys.cpus().iter().map(|c| c.usage()).collect();
        out.memory_total_bytes = sys.total_memory();
        out.memory_used_bytes = sys.used_memory();
        out.memory_available_bytes = sys.available_memory();
        out.swap_total_bytes = sys.total_swap();
        out.swap_used_bytes = sys.used_swap();
        out.process_count = self.process_count.take().unwrap_or_else(count_processes);
        // A share that is not finite or out of range (whatever the sampler computed) is fixed
        // here, where the values are made; the report builder checks the whole report again.
        let clamped = crate::bounds::clamp_host(&mut out);
        if clamped > 0 {
            tracing::debug!(clamped, "host sample values clamped");
        }
        out
    }

    /// Facts about the node that change rarely: OS, kernel, boot time, CPUs.
    pub fn node_facts(&self, info: &mut pb::NodeInfo) {
        info.os = System::long_os_version().unwrap_or_default();
        info.kernel = System::kernel_version().unwrap_or_default();
        info.boot_time_unix_ms = System::boot_time()
            .map(|s| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX))
            .unwrap_or(0);
        if let Some(sys) = self.sys.as_ref() {
            info.cpu_count = u32::try_from(sys.cpus().len()).unwrap_or(u32::MAX);
            info.cpu_brand = sys
                .cpus()
                .first()
                .map(|c| c.brand().to_owned())
                .unwrap_or_default();
        }
    }
}

/// Number of processes, from /proc on Linux (cheaper than a full sysinfo process refresh).
fn count_processes() -> u32 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let n = dir
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()))
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_sample_reads_this_machines_memory_and_cpus() {
        let mut c = HostCollector::new();
        let s = c.sample();
        assert!(s.memory_total_bytes > 0);
        assert!(s.memory_used_bytes <= s.memory_total_bytes);
        assert!(!s.cpu_percent_per_core.is_empty());
        assert!(
            s.cpu_percent_per_core
                .iter()
                .all(|p| (0.0..=100.0).contains(p))
        );
        assert!(s.uptime_secs > 0);
        assert!(s.process_count > 0);
        let mut info = pb::NodeInfo::default();
        c.node_facts(&mut info);
        assert_eq!(info.cpu_count as usize, s.cpu_percent_per_core.len());
        assert!(info.boot_time_unix_ms > 0);
    }
}
