//! `sov-agent`: the Sovereign node agent.
//!
//! Parts:
//! - [`config`]: the strict TOML configuration and its validation;
//! - [`collect`]: one module per observed thing (host today; GPUs, weights, flows later);
//! - [`spool`]: the durable, bounded, checksummed outbound queue on disk;
//! - [`transport`]: mutual-TLS gRPC channels, failover and jittered backoff;
//! - [`run`]: the report builder and the sender tasks;
//! - [`cli`]: the `sov-agent` command line (the binary only calls [`cli::main`]).

pub mod cli;
pub mod collect;
pub mod config;
pub mod run;
pub mod spool;
pub mod transport;

pub use config::AgentConfig;
pub use run::{Agent, AgentError};
