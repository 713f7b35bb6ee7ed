//! `sov-evidence`: what a regulator holds, and how it is checked without the collector.
//!
//! Parts:
//! - [`chain`]: the hash chain shared by the breach log and the audit log (canonical JSON,
//!   record hashes, [`chain::ChainVerifier`]);
//! - [`bom`]: the model inventory as a CycloneDX 1.6 AI bill of materials;
//! - [`checkpoint`]: signed checkpoints of a chained log's head (the collector's key), and
//!   the check of a log against them;
//! - [`audit`]: one query's audit record and its JSON form;
//! - [`report`]: signed evidence reports, their HTML form and their offline verification;
//! - [`view`]: how nodes, models, egress rows, breaches, the scorecard and the policy are
//!   printed (JSON objects, tables, CSV), identically by `sovctl` and the HTTPS API.
//!
//! Architecture invariant: this crate reads no database, opens no socket and knows no
//! command line; `sovctl` is built on it without the collector's storage or geolocation.

pub mod audit;
pub mod bom;
pub mod chain;
pub mod checkpoint;
pub mod report;
pub mod view;
