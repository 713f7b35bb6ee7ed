//! Which weight file to fingerprint next, and how much of it at a time: discovery stays fair
//! whatever the node holds.
//!
//! Order ([`priority`]), first to last:
//! 1. files that may belong to a restricted model, by the collector's hints
//!    ([`Hint`], from `Ack.restricted_models`: the policy's `match` strings) — a file named by
//!    a restricted sha256 (Hugging Face blobs and Ollama blobs are named by their sha256), or
//!    whose model name, repository, GGUF or Ollama name or publisher matches a glob;
//! 2. the other files, fewest bytes left to hash first (a small file never waits behind a big
//!    one), the most recently found first among equals;
//! 3. sparse files ([`is_sparse`]: fewer than one byte in [`SPARSE_RATIO`] of their size is
//!    allocated on disk; their holes read as zeros, so they cannot hold the weights their size
//!    suggests), last.
//!
//! Each turn hashes at most one slice ([`slice_bytes`]: about [`SLICE_SECS`] seconds at the
//! configured rate) of a file before choosing again, and the scanner rescans its roots between
//! turns, so a file copied in while a 1 TB file is being hashed is found and hashed within one
//! scan interval and one slice. The rate limit spans slices and files: the IO budget holds.

use std::time::Duration;

use sov_proto::pb;

/// One slice lasts about this long at the configured rate.
pub const SLICE_SECS: u64 = 5;
/// Smallest slice, and the slice when hashing is unlimited: 64 MiB and 1 GiB.
pub const MIN_SLICE_BYTES: u64 = 64 << 20;
pub const UNLIMITED_SLICE_BYTES: u64 = 1 << 30;
/// A file is sparse when its allocated bytes times this are below its size.
pub const SPARSE_RATIO: u64 = 8;
/// Files smaller than this are never called sparse (small files are cheap anyway, and
/// filesystems that store tiny files inline report no blocks).
pub const SPARSE_MIN_BYTES: u64 = 64 << 20;
/// Most hints kept, and the longest `match` string.
pub const MAX_HINTS: usize = 1024;
pub const MAX_HINT_BYTES: usize = 512;
/// Most half-hashed files remembered between turns (each about 200 bytes).
pub const MAX_PARTIALS: usize = 256;

/// Bytes of one slice at `rate` bytes per second (`None` = unlimited).
pub fn slice_bytes(rate: Option<u64>) -> u64 {
    match rate {
        Some(r) => r.saturating_mul(SLICE_SECS).max(MIN_SLICE_BYTES),
        None => UNLIMITED_SLICE_BYTES,
    }
}

/// Whether a file of `size` bytes with `allocated` bytes on disk is sparse.
pub fn is_sparse(size: u64, allocated: u64) -> bool {
    size >= SPARSE_MIN_BYTES && allocated.saturating_mul(SPARSE_RATIO) < size
}

/// One restricted-model hint, parsed from a policy `match` string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// Lower-case hex digest.
    Sha256(String),
    /// Publisher (or the organisation part of a repository id) glob.
    Publisher(String),
    /// Ollama `name:tag` glob (`:*` added when no tag was given).
    Ollama(String),
    /// A model name or repository id glob (`repo:`, `gguf:` or bare).
    Name(String),
}

impl Hint {
    /// Parses one policy `match`; `None` for something this agent does not understand.
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim();
        if t.is_empty() || t.len() > MAX_HINT_BYTES {
            return None;
        }
        let lower = t.to_ascii_lowercase();
        if let Some(hex) = lower.strip_prefix("sha256:") {
            return (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| Hint::Sha256(hex.to_owned()));
        }
        if let Some(g) = lower.strip_prefix("publisher:") {
            return Some(Hint::Publisher(g.to_owned()));
        }
        if let Some(g) = lower.strip_prefix("ollama:") {
            let g = g
                .trim_start_matches("registry.ollama.ai/")
                .trim_start_matches("library/");
            let g = if g.contains(':') {
                g.to_owned()
            } else {
                format!("{g}:*")
            };
            return Some(Hint::Ollama(g));
        }
        let name = lower
            .strip_prefix("repo:")
            .or_else(|| lower.strip_prefix("gguf:"))
            .unwrap_or(&lower);
        Some(Hint::Name(name.to_owned()))
    }

    /// Parses the hints of an ack, keeping at most [`MAX_HINTS`] that parse.
    pub fn from_ack(hints: &[pb::RestrictedModelHint]) -> Vec<Hint> {
        hints
            .iter()
            .filter_map(|h| Hint::parse(&h.r#match))
            .take(MAX_HINTS)
            .collect()
    }

    /// Whether `file` may belong to the model this hint names.
    pub fn matches(&self, file: &pb::WeightFile) -> bool {
        let id = file.identity.clone().unwrap_or_default();
        let model = id.model.to_ascii_lowercase();
        match self {
            Hint::Sha256(hex) => {
                file.sha256.eq_ignore_ascii_case(hex)
                    || std::iter::once(&file.path)
                        .chain(&file.aliases)
                        .any(|p| file_name(p).to_ascii_lowercase().contains(hex.as_str()))
            }
            Hint::Publisher(g) => {
                let publisher = if id.publisher.is_empty() {
                    model.split_once('/').map_or("", |(org, _)| org).to_owned()
                } else {
                    id.publisher.to_ascii_lowercase()
                };
                !publisher.is_empty() && glob(g, &publisher)
            }
            Hint::Ollama(g) => model.contains(':') && glob(g, &model),
            Hint::Name(g) => !model.is_empty() && glob(g, &model),
        }
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Case-insensitive glob (both sides already lower case): `*` any run, `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Where a pending file stands in the queue; smaller goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Priority {
    /// 0 restricted (by a hint), 1 ordinary, 2 sparse.
    pub class: u8,
    /// Bytes left to hash.
    pub remaining: u64,
    /// How long ago the file was found: newer first.
    pub age: Duration,
}

/// The priority of `file`, `done` bytes of which are already hashed, found `age` ago.
pub fn priority(file: &pb::WeightFile, done: u64, age: Duration, hints: &[Hint]) -> Priority {
    let class = if hints.iter().any(|h| h.matches(file)) {
        0
    } else if is_sparse(file.size_bytes, file.allocated_bytes) {
        2
    } else {
        1
    };
    Priority {
        class,
        remaining: file.size_bytes.saturating_sub(done),
        age,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf(path: &str, model: &str, size: u64) -> pb::WeightFile {
        pb::WeightFile {
            path: path.into(),
            size_bytes: size,
            allocated_bytes: size,
            identity: Some(pb::ModelIdentity {
                model: model.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn globs_match_like_the_policy() {
        assert!(glob("meta-llama/*", "meta-llama/llama-3-8b"));
        assert!(glob("*llama*", "meta-llama/llama-3-8b"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "abbc"));
        assert!(!glob("meta-llama/*", "acme/meta-llama"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
    }

    #[test]
    fn hints_parse_every_kind_of_policy_match_and_ignore_nonsense() {
        let hex = "ab".repeat(32);
        assert_eq!(
            Hint::parse(&format!("sha256:{}", hex.to_uppercase())),
            Some(Hint::Sha256(hex.clone()))
        );
        assert_eq!(Hint::parse("sha256:abc"), None);
        assert_eq!(
            Hint::parse("Publisher:Meta-*"),
            Some(Hint::Publisher("meta-*".into()))
        );
        assert_eq!(
            Hint::parse("ollama:llama3"),
            Some(Hint::Ollama("llama3:*".into()))
        );
        assert_eq!(
            Hint::parse("ollama:library/llama3:8b"),
            Some(Hint::Ollama("llama3:8b".into()))
        );
        assert_eq!(
            Hint::parse("repo:Acme/*"),
            Some(Hint::Name("acme/*".into()))
        );
        assert_eq!(Hint::parse("gguf:Tiny*"), Some(Hint::Name("tiny*".into())));
        assert_eq!(
            Hint::parse("acme/secret"),
            Some(Hint::Name("acme/secret".into()))
        );
        assert_eq!(Hint::parse(""), None);
        assert_eq!(Hint::parse(&"x".repeat(MAX_HINT_BYTES + 1)), None);
    }

    #[test]
    fn a_hint_matches_a_file_by_name_publisher_or_the_sha256_in_its_blob_name() {
        let hex = "cd".repeat(32);
        let blob = wf(&format!("/hf/models--x--y/blobs/{hex}"), "x/y", 10);
        assert!(
            Hint::parse(&format!("sha256:{hex}"))
                .unwrap()
                .matches(&blob)
        );
        let ollama = wf(&format!("/ollama/blobs/sha256-{hex}"), "llama3:8b", 10);
        assert!(
            Hint::parse(&format!("sha256:{hex}"))
                .unwrap()
                .matches(&ollama)
        );
        assert!(Hint::parse("ollama:llama3").unwrap().matches(&ollama));
        assert!(!Hint::parse("ollama:mistral").unwrap().matches(&ollama));
        let hf = wf("/m/a.safetensors", "Acme/Secret-7B", 10);
        assert!(Hint::parse("acme/secret-*").unwrap().matches(&hf));
        assert!(Hint::parse("publisher:acme").unwrap().matches(&hf));
        assert!(!Hint::parse("publisher:other").unwrap().matches(&hf));
        assert!(
            !Hint::parse(&format!("sha256:{}", "ef".repeat(32)))
                .unwrap()
                .matches(&hf)
        );
    }

    #[test]
    fn restricted_then_small_then_new_then_sparse() {
        let hints = vec![Hint::parse("acme/secret").unwrap()];
        let big = priority(
            &wf("/m/big", "x/big", 4 << 30),
            0,
            Duration::from_secs(1),
            &hints,
        );
        let small = priority(
            &wf("/m/small", "x/small", 1 << 20),
            0,
            Duration::from_secs(100),
            &hints,
        );
        let restricted = priority(
            &wf("/m/r", "acme/secret", 8 << 30),
            0,
            Duration::from_secs(100),
            &hints,
        );
        let mut sparse_file = wf("/m/s", "x/s", 1 << 40);
        sparse_file.allocated_bytes = 8192;
        let sparse = priority(&sparse_file, 0, Duration::ZERO, &hints);
        let newer_small = priority(
            &wf("/m/small2", "x/s2", 1 << 20),
            0,
            Duration::from_secs(5),
            &hints,
        );
        let mut order = vec![big, sparse, small, restricted, newer_small];
        order.sort();
        assert_eq!(order, [restricted, newer_small, small, big, sparse]);
        // A half-hashed big file ranks by what is left.
        let half = priority(
            &wf("/m/big", "x/big", 4 << 30),
            4 << 30,
            Duration::from_secs(1),
            &[],
        );
        assert_eq!(half.remaining, 0);
    }

    #[test]
    fn sparse_means_few_allocated_bytes_for_a_large_size() {
        assert!(is_sparse(1 << 40, 8192));
        assert!(!is_sparse(1 << 40, 1 << 40));
        assert!(!is_sparse(1 << 20, 0), "small files are never sparse");
        // Compressed filesystems allocate less than the size, but not eight times less.
        assert!(!is_sparse(10 << 30, 6 << 30));
    }

    #[test]
    fn a_slice_is_about_five_seconds_of_the_rate() {
        assert_eq!(slice_bytes(Some(100_000_000)), 500_000_000);
        assert_eq!(slice_bytes(Some(1_000_000)), MIN_SLICE_BYTES);
        assert_eq!(slice_bytes(None), UNLIMITED_SLICE_BYTES);
    }
}
