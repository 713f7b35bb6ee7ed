//! `sov-proto`: the `sovereign.v1` wire contract shared by the agent, the collector and `sovctl`.
//!
//! The `.proto` files under `sovereign/v1/` are the source of truth; `build.rs` generates the
//! Rust code with protox at build time. Everything is re-exported as one module, [`pb`].

/// Generated messages and gRPC services of the `sovereign.v1` package.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("sovereign.v1");
}
