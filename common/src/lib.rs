//! `sov-common`: what the agent, the collector and `sovctl` share, and nothing that knows
//! about either of them.
//!
//! Parts:
//! - [`config`]: every problem of a configuration at once ([`config::Problems`]), TOML
//!   reading with messages naming the file, the shared field checks, exit code 64;
//! - [`cli`]: log format and tracing set-up, the shutdown signal, writing to stdout;
//! - [`error`]: an error's causes on one line ([`error::source_chain`]);
//! - [`clock`]: the wall clock in Unix milliseconds ([`clock::now_unix_ms`]);
//! - [`host`]: this machine's host name;
//! - [`prometheus`]: the Prometheus text exposition and its tiny HTTP/1.1 server;
//! - [`tls`]: the client side of mutual TLS ([`tls::ClientTls`]);
//! - [`tls_diagnose`]: TLS failures and certificate files checked, in plain words.
//!
//! Architecture invariant: this crate depends on no other crate of the workspace.

pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod host;
pub mod prometheus;
pub mod tls;
pub mod tls_diagnose;
