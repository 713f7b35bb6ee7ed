//! What the agent observes, one file per observed thing.
//!
//! - [`host`]: CPU (total and per core), memory, swap, load, uptime, node facts (sysinfo).
//!
//! GPUs, processes, weight files and flows arrive in later work; their wire messages already
//! exist in `sovereign.v1` and the report builder leaves them empty until then.

pub mod host;
