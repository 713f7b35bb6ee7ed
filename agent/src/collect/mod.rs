//! What the agent observes, one file (or folder) per observed thing; [`crate::observe`] is the
//! one place that calls them in order.
//!
//! - [`host`]: CPU (total and per core), memory, swap, load, uptime, node facts (sysinfo);
//! - [`gpu`]: NVIDIA GPUs through NVML behind the `GpuProbe` trait (and a scripted double);
//! - [`proctable`]: the live processes, shared by every collector (process events, else listings);
//! - [`procs`]: processes from `/proc`: the top N by CPU and memory plus interesting ones;
//! - [`cache`]: hits and misses of the per-process caches, for `/metrics`;
//! - [`containers`]: who a process is in container terms (container, image, Kubernetes pod);
//! - [`namespaces`]: which network and mount namespace a process is in;
//! - [`weights`]: model weight files, from the roots, inside containers and from processes;
//! - [`net`]: flows per process in every network namespace;
//! - [`training`]: training runs (processes writing weight files while mapping others or using a
//!   GPU), their inputs (base weights, datasets) and outputs (checkpoints).

pub mod cache;
pub mod containers;
pub mod gpu;
pub mod host;
pub mod namespaces;
pub mod net;
pub mod procs;
pub mod proctable;
pub mod training;
pub mod weights;

/// The soft limit on open descriptors (`/proc/self/limits`), when it can be read: what holds
/// files open (the training sampler's candidates, the network namespaces' counters) keeps
/// within a share of it.
pub fn descriptor_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The whole error chain on one line (`outer: cause: root cause`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
