//! What the agent observes, one file (or folder) per observed thing; [`crate::observe`] is the
//! one place that calls them in order.
//!
//! - [`host`]: CPU (total and per core), memory, swap, load, uptime, node facts (sysinfo);
//! - [`gpu`]: NVIDIA GPUs through NVML behind the `GpuProbe` trait (and a scripted double);
//! - [`procs`]: processes from `/proc`: the top N by CPU and memory plus interesting ones.
//!
//! Weight files and flows arrive in later work; their wire messages already exist in
//! `sovereign.v1`.

pub mod gpu;
pub mod host;
pub mod net;
pub mod procs;
pub mod weights;
