//! Parsers of outside input, one function per fuzz target, shared by the cargo-fuzz targets
//! in `fuzz/fuzz_targets/` and by `tests/tests/hostile_input.rs`, which runs every target on
//! its committed corpus (`fuzz/corpus/<target>/`) and on bounded mutations of it with a
//! seeded generator, so that `cargo test` on the stable toolchain exercises the same calls
//! the fuzzer does. Each function must return (any result) for any input: a panic, an abort
//! or an endless loop is the bug.

use std::path::Path;

use prost::Message as _;
use sov_proto::pb;

/// A target: its name (the corpus folder) and the function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target beside the five weight-format targets of `fuzz/` (which have their own unit
/// tests in `agent/src/collect/weights/formats/`).
pub const TARGETS: &[Target] = &[
    ("report", report),
    ("policy", policy),
    ("geo_csv", geo_csv),
    ("geo_delegated", geo_delegated),
    ("mountinfo", mountinfo),
    ("procnet", procnet),
    ("sock_diag", sock_diag),
    ("ollama_manifest", ollama_manifest),
];

/// A report as the collector receives it: protobuf decoding, then ingest validation.
pub fn report(data: &[u8]) {
    if let Ok(r) = pb::Report::decode(data) {
        let _ = sov_collector::ingest::validate(&r);
    }
}

/// A policy file (TOML), as `policy check` and the collector's reload read it.
pub fn policy(data: &[u8]) {
    let _ = sov_collector::policy::Policy::parse(&String::from_utf8_lossy(data), "fuzz");
}

/// A CSV range file of the geolocation databases.
pub fn geo_csv(data: &[u8]) {
    let _ = sov_collector::geo::csv::Csv::parse(Path::new("fuzz.csv"), data);
}

/// A registry's delegated statistics file.
pub fn geo_delegated(data: &[u8]) {
    let _ = sov_collector::geo::delegated::Delegated::parse(
        Path::new("delegated-fuzz-extended-latest"),
        data,
        None,
    );
}

/// `/proc/<pid>/mountinfo`.
pub fn mountinfo(data: &[u8]) {
    let table =
        sov_agent::collect::weights::storage::MountTable::parse(&String::from_utf8_lossy(data));
    let _ = table.mounts().len();
}

/// `/proc/net/{tcp,udp}{,6}` tables.
pub fn procnet(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut out = Vec::new();
    for v6 in [false, true] {
        for proto in [pb::Protocol::Tcp, pb::Protocol::Udp] {
            let _ = sov_agent::collect::net::procnet::parse(&text, proto, v6, &mut out);
        }
    }
}

/// One `sock_diag` message payload (`inet_diag_msg` and its attributes) from the kernel.
pub fn sock_diag(data: &[u8]) {
    let _ = sov_agent::collect::net::diag::decode(data, pb::Protocol::Tcp);
}

/// An Ollama manifest (JSON) from the models directory.
pub fn ollama_manifest(data: &[u8]) {
    let _ = sov_agent::collect::weights::identity::weight_layer_digests(data);
}

/// A small deterministic generator (xorshift64*), so a failing run can be repeated.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded; 0 is replaced by a constant.
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
    }
}

/// Bytes a fuzzer likes to try.
const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'\n', b':', b',', b'|', b'"', b'[', b'=', b' ',
];

/// One mutation of `input` (bit flip, interesting byte, truncation, duplication, insertion of
/// random bytes, or a splice with `other`), at most `max_len` bytes long.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => out.truncate(rng.below(out.len() + 1)),
            3 if !out.is_empty() => {
                let a = rng.below(out.len());
                let b = a + rng.below(out.len() - a + 1);
                let slice = out[a..b].to_vec();
                let at = rng.below(out.len() + 1);
                out.splice(at..at, slice);
            }
            4 => {
                let at = rng.below(out.len() + 1);
                let bytes: Vec<u8> = (0..rng.below(16)).map(|_| rng.next_u64() as u8).collect();
                out.splice(at..at, bytes);
            }
            _ if !other.is_empty() => {
                let cut = rng.below(out.len() + 1);
                let from = rng.below(other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            _ => {}
        }
    }
    out.truncate(max_len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_deterministic_and_mutations_respect_the_length_bound() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            assert!(mutate(&mut rng, &[1; 100], &[2; 100], 120).len() <= 120);
        }
    }
}
