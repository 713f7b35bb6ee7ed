//! Every parser of outside input survives its fuzz corpus and bounded mutations of it: the
//! same target functions as the cargo-fuzz targets (`sov_e2e::hostile`), run on the stable
//! toolchain. `SOV_FUZZ_ITERATIONS` (default 20000) sets the mutations per target and
//! `SOV_FUZZ_SEED` the generator's seed (printed on failure, with the input).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::PathBuf;

use sov_e2e::hostile::{Rng, TARGETS, mutate};

/// Longest mutated input.
const MAX_LEN: usize = 64 * 1024;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn every_parser_of_outside_input_survives_its_corpus_and_mutations_of_it() {
    let iterations = env_u64("SOV_FUZZ_ITERATIONS", 20_000);
    let seed = env_u64("SOV_FUZZ_SEED", 0x5eed);
    for &(name, target) in TARGETS {
        let seeds = corpus(name);
        assert!(seeds.len() >= 2, "{name}: corpus needs at least two inputs");
        let mut rng = Rng::new(seed ^ name.len() as u64);
        let run = |input: &[u8], what: &str| {
            if std::panic::catch_unwind(|| target(input)).is_err() {
                panic!(
                    "{name} panicked on {what} (SOV_FUZZ_SEED={seed}): {:?}",
                    String::from_utf8_lossy(&input[..input.len().min(400)])
                );
            }
        };
        for (i, s) in seeds.iter().enumerate() {
            run(s, &format!("corpus input {i}"));
        }
        for i in 0..iterations {
            let a = &seeds[rng.below(seeds.len())];
            let b = &seeds[rng.below(seeds.len())];
            let input = mutate(&mut rng, a, b, MAX_LEN);
            run(&input, &format!("mutation {i}"));
        }
        // Pure noise too.
        for i in 0..iterations / 10 {
            let len = rng.below(4096);
            let input: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            run(&input, &format!("random input {i}"));
        }
    }
}

/// Writes the generated seeds (those that are not plain text) into `fuzz/corpus/`; run by
/// hand: `cargo test -p sov-e2e --test hostile_input -- --ignored write_binary_seeds`.
#[test]
#[ignore = "writes into the source tree; run by hand to regenerate the binary seeds"]
fn write_binary_seeds() {
    use prost::Message as _;
    let dir = corpus_dir("report");
    std::fs::create_dir_all(&dir).unwrap();
    let mut r = sov_e2e::report_with_flows(
        "node-a",
        3,
        vec![
            sov_e2e::outbound_flow("203.0.113.9", 1000),
            sov_e2e::outbound_flow("2001:db8::1", 5),
        ],
    );
    r.gaps.push(sov_proto::pb::Gap {
        first_seq: 1,
        last_seq: 2,
        ..Default::default()
    });
    std::fs::write(dir.join("flows_and_gap.bin"), r.encode_to_vec()).unwrap();
    std::fs::write(
        dir.join("minimal.bin"),
        sov_e2e::report("n", 1, 1).encode_to_vec(),
    )
    .unwrap();
    // sock_diag: an inet_diag_msg for 10.0.0.5:50000 -> 203.0.113.9:443, established, then
    // an INET_DIAG_INFO-less attribute list.
    let dir = corpus_dir("sock_diag");
    std::fs::create_dir_all(&dir).unwrap();
    let mut msg = vec![2u8, 1, 0, 0]; // family AF_INET, state ESTABLISHED, timer, retrans
    msg.extend_from_slice(&50000u16.to_be_bytes());
    msg.extend_from_slice(&443u16.to_be_bytes());
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&[10, 0, 0, 5]);
    let mut dst = [0u8; 16];
    dst[..4].copy_from_slice(&[203, 0, 113, 9]);
    msg.extend_from_slice(&src);
    msg.extend_from_slice(&dst);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // interface
    msg.extend_from_slice(&[0xff; 8]); // cookie
    msg.extend_from_slice(&0u32.to_ne_bytes()); // expires
    msg.extend_from_slice(&0u32.to_ne_bytes()); // rqueue
    msg.extend_from_slice(&0u32.to_ne_bytes()); // wqueue
    msg.extend_from_slice(&1000u32.to_ne_bytes()); // uid
    msg.extend_from_slice(&12345u32.to_ne_bytes()); // inode
    std::fs::write(dir.join("inet_established.bin"), &msg).unwrap();
    let mut with_attr = msg.clone();
    // INET_DIAG_PROTOCOL (type 19) = TCP (6), padded.
    with_attr.extend_from_slice(&5u16.to_ne_bytes());
    with_attr.extend_from_slice(&19u16.to_ne_bytes());
    with_attr.extend_from_slice(&[6, 0, 0, 0]);
    std::fs::write(dir.join("inet_with_protocol.bin"), &with_attr).unwrap();
}
