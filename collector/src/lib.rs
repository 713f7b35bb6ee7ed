//! `sov-collector`: receives agents' reports, stores them durably, and answers regulators.
//!
//! Parts, by layer, bottom up (a part names only parts of lower layers: checked by
//! `tests/architecture.rs`; the map is `docs/ARCHITECTURE.md`):
//!
//! 0. [`error`]: the domain error, mapped once to gRPC and HTTP;
//! 1. [`auth`]: peer certificate → [`auth::Identity`] (name and role from a SPIFFE URI SAN);
//!    [`breach`]: policy breaches (open → updated → resolved) and the record of each change;
//! 2. [`pki`]: certificates without openssl (`sov-collector pki`); [`p12`]: PKCS#12 browser
//!    bundles of them; [`store`]: the
//!    [`store::Store`] trait, its row types, and one folder per backend (SQLite, PostgreSQL);
//! 3. [`token`]: API tokens for the HTTPS API; [`geo`]: where remote addresses are;
//!    [`metrics`]: the collector's counters, served as Prometheus text on `/metrics`;
//!    [`checkpoint`]: signed checkpoints of the breach and audit logs' heads, and the check
//!    of a log against them;
//! 4. [`tls`]: the TLS front door of gRPC and HTTPS; [`policy`]: the jurisdiction policy, the
//!    breach rules and their evaluation loop; [`alert`]: sinks, routing and the outbox;
//!    [`enroll`]: enrollment tokens and the `Enroll` service;
//! 5. [`derive`]: what is computed from committed reports, in batches, after the ack (the
//!    deriver), and how fresh that is;
//! 6. [`ingest`]: the `Ingest` service (authenticate, validate, append, then ack);
//!    [`query`]: the `Query` service over gRPC and HTTPS, and the web page;
//! 7. [`config`]: the configuration file's root (each section is declared by its part);
//! 8. [`server`]: the gRPC edge (Ingest, Query, Enroll over mutual TLS);
//! 9. [`app`]: startup as build, then spawn (`app::run(config, store, listener, shutdown)`);
//! 10. [`dev`]: the all-in-one quickstart (`sov-collector dev`), the one part that embeds an
//!     agent;
//! 11. [`cli`]: the command line (the binary only calls its `main`).

pub mod alert;
pub mod app;
pub mod auth;
pub mod breach;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod derive;
pub mod dev;
pub mod enroll;
pub mod error;
pub mod geo;
pub mod ingest;
pub mod metrics;
pub mod p12;
pub mod pki;
pub mod policy;
pub mod query;
pub mod server;
pub mod store;
pub mod tls;
pub mod token;

pub use config::CollectorConfig;
