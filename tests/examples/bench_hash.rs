//! Fingerprint throughput: the agent's streaming `sha256_file` (IO rate limit off) against
//! `openssl dgst -sha256` and coreutils `sha256sum` on the same file, in one run, plus the bench
//! process's peak RSS next to the file size (the hash streams through a fixed buffer).
//!
//! ```sh
//! cargo run --release -p sov-e2e --example bench_hash -- [--size-mb 1024] [--dir /tmp]
//! ```
//!
//! The file is pseudo-random, written once, then read once so that every measurement reads
//! it from the page cache (when it fits in RAM; the table says whether it does). Each tool
//! runs twice, interleaved; the best run of each is reported. Throughput is in MB/s
//! (10^6 bytes per second); external tools are timed from spawn to exit. Target: ours at
//! least 90 % of openssl's.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sov_agent::collect::weights::hash::{HASH_BUF_BYTES, RateLimiter, sha256_file};

const ROUNDS: usize = 2;
const TARGET_RATIO: f64 = 0.90;

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// A `kB` line of `/proc/self/status` or `/proc/meminfo`, in bytes.
fn kib_field(file: &str, field: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn peak_rss() -> u64 {
    kib_field("/proc/self/status", "VmHWM:")
}

/// Writes `size` bytes of xorshift64* noise, 1 MiB at a time.
fn generate(path: &Path, size: u64) -> anyhow::Result<()> {
    let mut w = BufWriter::with_capacity(HASH_BUF_BYTES, File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; HASH_BUF_BYTES];
    let mut left = size;
    while left > 0 {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            word.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        let n = usize::try_from(left.min(chunk.len() as u64))?;
        w.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// Reads the whole file once so that the measurements read it from the page cache.
fn warm(path: &Path) -> anyhow::Result<()> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; HASH_BUF_BYTES];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

fn ours(path: &Path) -> anyhow::Result<(Duration, String)> {
    let started = Instant::now();
    let sha = sha256_file(
        path,
        &mut RateLimiter::new(None),
        &AtomicBool::new(false),
        &mut |_| {},
    )?;
    Ok((started.elapsed(), sha))
}

/// Runs `program args… path`, returning its wall time and the first 64-hex-digit word of its
/// output. `None` when the program is missing.
fn external(
    program: &str,
    args: &[&str],
    path: &Path,
) -> anyhow::Result<Option<(Duration, String)>> {
    let started = Instant::now();
    let out = match Command::new(program).args(args).arg(path).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("running {program}")),
    };
    let took = started.elapsed();
    if !out.status.success() {
        bail!("{program} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let sha = text
        .split(|c: char| c.is_whitespace() || c == '=')
        .find(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .with_context(|| format!("no digest in {program}'s output: {text}"))?
        .to_ascii_lowercase();
    Ok(Some((took, sha)))
}

fn mb_per_s(size: u64, d: Duration) -> f64 {
    size as f64 / 1e6 / d.as_secs_f64()
}

struct Tool {
    name: &'static str,
    best: Option<Duration>,
    sha: Option<String>,
    missing: bool,
}

impl Tool {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            best: None,
            sha: None,
            missing: false,
        }
    }

    fn record(&mut self, result: Option<(Duration, String)>) -> anyhow::Result<()> {
        let Some((took, sha)) = result else {
            self.missing = true;
            return Ok(());
        };
        if let Some(prev) = &self.sha
            && *prev != sha
        {
            bail!("{} gave two different digests", self.name);
        }
        self.sha = Some(sha);
        self.best = Some(self.best.map_or(took, |b| b.min(took)));
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let size_mb: u64 = arg(&args, "--size-mb").map_or(Ok(1024), str::parse)?;
    let dir = arg(&args, "--dir").map_or_else(std::env::temp_dir, PathBuf::from);
    let size = size_mb * 1_000_000;
    let mem_total = kib_field("/proc/meminfo", "MemTotal:");
    let mem_available = kib_field("/proc/meminfo", "MemAvailable:");

    let tmp = tempfile::Builder::new()
        .prefix("bench-hash-")
        .tempdir_in(&dir)?;
    let path = tmp.path().join("weights.bin");
    eprintln!(
        "writing {size_mb} MB of pseudo-random data to {}",
        path.display()
    );
    generate(&path, size)?;
    warm(&path)?;
    let rss_before = peak_rss();

    let mut tools = [
        Tool::new("sov sha256_file"),
        Tool::new("openssl dgst -sha256"),
        Tool::new("sha256sum"),
    ];
    for round in 1..=ROUNDS {
        eprintln!("round {round}/{ROUNDS}");
        tools[0].record(Some(ours(&path)?))?;
        tools[1].record(external("openssl", &["dgst", "-sha256"], &path)?)?;
        tools[2].record(external("sha256sum", &[], &path)?)?;
    }
    let rss_after = peak_rss();

    let reference = tools[0].sha.clone().context("no digest of ours")?;
    for t in &tools {
        if let Some(sha) = &t.sha
            && *sha != reference
        {
            bail!("{} disagrees: {sha} vs ours {reference}", t.name);
        }
    }

    let fits = size < mem_available;
    println!(
        "file: {size_mb} MB ({size} bytes), RAM {:.1} GB total, {:.1} GB available: {}",
        mem_total as f64 / 1e9,
        mem_available as f64 / 1e9,
        if fits {
            "the file was in the page cache for every run (warm)"
        } else {
            "the file is larger than available RAM, so runs read (partly) from disk"
        }
    );
    println!("sha256 {reference} (all tools agree)");
    println!(
        "{:<24} {:>10} {:>10}",
        "tool (best of 2)", "seconds", "MB/s"
    );
    for t in &tools {
        match t.best {
            Some(b) => println!(
                "{:<24} {:>10.3} {:>10.0}",
                t.name,
                b.as_secs_f64(),
                mb_per_s(size, b)
            ),
            None => println!("{:<24} {:>10} {:>10}", t.name, "-", "missing"),
        }
    }
    let speed = |t: &Tool| t.best.map(|b| mb_per_s(size, b));
    let (ours_mb_s, openssl_mb_s, sha256sum_mb_s) =
        (speed(&tools[0]), speed(&tools[1]), speed(&tools[2]));
    let ratio = ours_mb_s.zip(openssl_mb_s).map(|(o, s)| o / s);
    match ratio {
        Some(r) => println!(
            "ours / openssl = {:.1} % (target >= {:.0} %): {}",
            r * 100.0,
            TARGET_RATIO * 100.0,
            if r >= TARGET_RATIO { "MET" } else { "NOT MET" }
        ),
        None => println!("openssl missing: no comparison (install openssl to check the target)"),
    }
    println!(
        "peak RSS (VmHWM): {:.1} MB before hashing, {:.1} MB after, for a {:.0} MB file \
         (streaming buffer {} KiB)",
        rss_before as f64 / 1e6,
        rss_after as f64 / 1e6,
        size as f64 / 1e6,
        HASH_BUF_BYTES / 1024
    );
    let json = serde_json::json!({
        "bench": "hash",
        "size_bytes": size,
        "page_cache": if fits { "warm" } else { "partial" },
        "mem_total_bytes": mem_total,
        "rounds": ROUNDS,
        "ours_mb_s": ours_mb_s,
        "openssl_mb_s": openssl_mb_s,
        "sha256sum_mb_s": sha256sum_mb_s,
        "ratio_vs_openssl": ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio.map(|r| r >= TARGET_RATIO),
        "peak_rss_before_bytes": rss_before,
        "peak_rss_after_bytes": rss_after,
        "buffer_bytes": HASH_BUF_BYTES,
    });
    println!("{json}");
    Ok(())
}
