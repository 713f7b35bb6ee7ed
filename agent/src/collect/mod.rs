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
