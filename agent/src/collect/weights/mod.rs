//! Model weight files: where they physically reside, what model they are, who uses them.
//!
//! - [`discover`]: default roots and the bounded walk (readdir + stat only);
//! - [`formats`]: content sniffing and header parsing, one file per format, hostile-input safe;
//! - [`identity`]: Hugging Face cache layout, Ollama manifests, directory names, shards;
//! - [`lineage`]: the base models a file declares (PEFT adapter config, GGUF `general.base_model.*`,
//!   safetensors `__metadata__`, model card, `config.json`);
//! - [`storage`]: mountinfo → filesystem, local or network, and the storage server;
//! - [`users`]: processes that map or hold each file open (`/proc/<pid>/maps`, `fd/`);
//! - [`hash`]: streaming sha256 under an IO rate limit, and the persistent fingerprint cache;
//! - [`schedule`]: which file to fingerprint next (restricted hints, small and new first, sparse
//!   last) and how much of it at a time;
//! - [`inventory`]: the scanner thread and the inventory the report builder takes updates from.

pub mod discover;
pub mod formats;
pub mod hash;
pub mod identity;
pub mod inventory;
pub mod lineage;
pub mod schedule;
pub mod storage;
pub mod users;
