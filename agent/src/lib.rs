//! `sov-agent`: the Sovereign node agent.
//!
//! Parts:
//! - [`config`]: the strict TOML configuration and its validation;
//! - [`collect`]: one module per observed thing (host, GPUs, processes; weights and flows later);
//! - [`observe`]: the one dispatch point over the collectors, shared by `run` and `scan`;
//! - [`budget`]: the agent's own resource limits and what it sheds when over them;
//! - [`scan`]: `sov-agent scan`, one snapshot as a table or JSON;
//! - [`bounds`]: the wire contract every report satisfies (integers ≤ 2^63-1, finite shares,
//!   each weight file ≤ 64 KiB);
//! - [`shape`]: packing the inventory into reports by size, and trimming a refused report;
//! - [`spool`]: the durable, bounded, checksummed outbound queue on disk;
//! - [`skipped`]: test support: a skipped test leaves a line that `.ci/run` prints;
//! - [`transport`]: mutual-TLS gRPC channels, failover and jittered backoff;
//! - [`run`]: the report builder and the sender tasks;
//! - [`cli`]: the `sov-agent` command line (the binary only calls [`cli::main`]).

pub mod bounds;
pub mod budget;
pub mod cli;
pub mod collect;
pub mod config;
pub mod enroll;
pub mod metrics;
pub mod observe;
pub mod run;
pub mod scan;
pub mod shape;
pub mod skipped;
pub mod spool;
pub mod transport;

pub use config::AgentConfig;
pub use run::{Agent, AgentError};
/// The Prometheus exposition, shared with the collector.
pub use sov_common::prometheus;
