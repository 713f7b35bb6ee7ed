//! `sov-collector`: receives agents' reports, stores them durably, and answers regulators.
//!
//! Parts:
//! - [`config`]: the strict TOML configuration;
//! - [`auth`]: peer certificate → [`auth::Identity`] (name and role from a SPIFFE URI SAN);
//! - [`token`]: API tokens for the HTTPS API (stored hashed, scoped to a role, expiring);
//! - [`breach`]: policy breaches (open → updated → resolved) and their hash-chained log;
//! - [`pki`]: certificates without openssl (`sov-collector pki`);
//! - [`ingest`]: the `Ingest` gRPC service (authenticate, validate, commit, then ack);
//! - [`query`]: the `Query` gRPC service;
//! - [`store`]: the [`store::Store`] trait and its SQLite backend;
//! - [`policy`]: the jurisdiction policy file (inside countries, sites, model classes,
//!   publishers, allowed destinations, thresholds), its validation and reloading;
//! - [`tls`]: the TLS front door of gRPC and HTTPS: certificate, CA and revocation deny list
//!   reloaded when their files change, the connection limit and the handshake timeout;
//! - [`server`]: the gRPC edge (Ingest, Query, Enroll over mutual TLS);
//! - [`app`]: startup as build, then spawn (`app::run(config, store, listener, shutdown)`);
//! - [`alert`]: breach alerts: the [`alert::Sink`] trait, webhook, Alertmanager, Slack and
//!   syslog sinks, routing by rule and severity, and the outbox's retry schedule;
//! - [`metrics`]: the collector's counters and gauges, served as Prometheus text on `/metrics`;
//! - [`dev`]: the all-in-one quickstart (`sov-collector dev`);
//! - [`cli`]: the command line (the binary only calls its `main`).

pub mod alert;
pub mod app;
pub mod auth;
pub mod breach;
pub mod cli;
pub mod config;
pub mod dev;
pub mod enroll;
pub mod error;
pub mod geo;
pub mod ingest;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod query;
pub mod server;
pub mod store;
pub mod tls;
pub mod token;

pub use config::CollectorConfig;
