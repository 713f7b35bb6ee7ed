//! One flow sample with N open TCP connections (2N sockets), compared in the same run with
//! `ss -tinp` listing the same sockets. Targets: the cold sample (first, owners unknown: every
//! `/proc/<pid>/fd` is walked) at most `ss -tinp`'s time; the steady-state sample (owners
//! remembered) well under it: at most a quarter.
//!
//! ```sh
//! cargo run --release -p sov-e2e --example bench_flows -- --connections 10000
//! ```
//!
//! The server side runs in a child process (this program with `--serve`), so each process holds
//! N + a few descriptors (2N would not fit the hard limit of 20,000 on some machines, and two
//! processes are closer to a real node). Each process first tries to raise its soft limit by
//! re-executing itself once through `sh -c 'ulimit -n 65536; exec "$0" "$@"'` (marker:
//! `SOV_BENCH_FLOWS_ULIMIT`), so no libc call is needed. Then N loopback connections are opened
//! (N connects here, N accepts in the child, each connection moving 1 KiB each way), and it times:
//! - `ss -tinp` (TCP sockets with `tcp_info` and owning processes), best of 3;
//! - our cold first sample (`include_loopback = true`);
//! - our steady-state sample (second and later), best and median of `--runs` (default 5);
//! - then a burst: every connection closed at once, and how many destroy events arrive.
//!
//! CPU time is the sampling thread's own (`/proc/thread-self/schedstat`, nanoseconds).
//!
//! # A node of pods (`--namespaces N`)
//!
//! ```sh
//! cargo run --release -p sov-e2e --example bench_flows -- --namespaces 100 --per-namespace 100 --mappers 300 --files 20
//! ```
//!
//! N network namespaces (as many pods), each with one process holding `--per-namespace` TCP
//! connections over its own loopback (2 × that many sockets), and `--mappers` processes each
//! mapping the same `--files` weight files (1 MiB safetensors outside every root). It times, in
//! the same run:
//! - `ss -tinp` run in every namespace (`ip netns exec NS ss -tinp`, one after the other), the
//!   whole round, best of 3, against the agent's flow sample of every namespace (cold: the
//!   namespaces are entered and every owner is looked up; steady: best and median of `--runs`);
//! - the weight scan that finds the mapped files through the processes (cold: one pass over
//!   every process's maps and descriptors and the files sniffed and hashed; steady: the pass
//!   alone);
//! - this process's resident memory before the agent's collectors exist and after (the agent's
//!   added RSS). Needs root (namespaces) and python3 (the workloads).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sov_agent::collect::net::{NetCollector, now_unix_ms};
use sov_agent::config::NetConfig;

const ULIMIT_MARKER: &str = "SOV_BENCH_FLOWS_ULIMIT";
const WANT_FDS: u64 = 65_536;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU nanoseconds of the calling thread.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn open_fd_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Re-execute through `sh` with a raised descriptor limit, once.
fn reexec_with_more_fds() -> anyhow::Result<Option<i32>> {
    if std::env::var_os(ULIMIT_MARKER).is_some() || open_fd_limit() >= WANT_FDS {
        return Ok(None);
    }
    let exe = std::env::current_exe()?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {WANT_FDS} 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"; exec \"$0\" \"$@\""
        ))
        .arg(exe)
        .args(std::env::args().skip(1))
        .env(ULIMIT_MARKER, "1")
        .status()?;
    Ok(Some(status.code().unwrap_or(1)))
}

/// `--serve`: accept N connections, echo 1 KiB on each, say "ready", hold them until stdin
/// closes.
fn serve(n: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", listener.local_addr()?.port())?;
    out.flush()?;
    let mut accepted = Vec::with_capacity(n);
    let mut buf = [0u8; 1024];
    for _ in 0..n {
        let (mut s, _) = listener.accept()?;
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
        accepted.push(s);
    }
    writeln!(out, "ready")?;
    out.flush()?;
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest)?;
    drop(accepted);
    Ok(())
}

/// Start the server child and open N connections to it.
fn open_connections(n: usize) -> anyhow::Result<(Child, Vec<TcpStream>)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--serve", "--connections", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no child stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let port: u16 = lines
        .next()
        .ok_or_else(|| anyhow::anyhow!("the server child said nothing"))??
        .trim()
        .parse()?;
    let mut clients = Vec::with_capacity(n);
    let payload = [5u8; 1024];
    let mut back = [0u8; 1024];
    for _ in 0..n {
        let mut c = TcpStream::connect(("127.0.0.1", port))?;
        c.write_all(&payload)?;
        c.read_exact(&mut back)?;
        clients.push(c);
    }
    let ready = lines
        .next()
        .ok_or_else(|| anyhow::anyhow!("the server child stopped"))??;
    anyhow::ensure!(ready == "ready", "server child said {ready:?}");
    Ok((child, clients))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `runs` samples: their wall times and the sampling thread's CPU times, milliseconds, sorted.
fn steady_samples(collector: &mut NetCollector, runs: usize) -> (Vec<f64>, Vec<f64>) {
    let mut wall = Vec::with_capacity(runs);
    let mut cpu = Vec::with_capacity(runs);
    for _ in 0..runs {
        let cpu0 = thread_cpu_ns();
        let t = Instant::now();
        collector.sample(now_unix_ms());
        wall.push(ms(t.elapsed()));
        cpu.push((thread_cpu_ns() - cpu0) as f64 / 1e6);
    }
    wall.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    (wall, cpu)
}

fn main() -> anyhow::Result<()> {
    if let Some(code) = reexec_with_more_fds()? {
        std::process::exit(code);
    }
    let n = arg("--connections", 10_000);
    let runs = arg("--runs", 5).max(1);
    let limit = open_fd_limit();
    anyhow::ensure!(
        limit >= n as u64 + 64,
        "open-file limit {limit} is too low for {n} connections: run with `ulimit -n {WANT_FDS}`"
    );
    if std::env::args().any(|a| a == "--serve") {
        return serve(n);
    }
    let namespaces = arg("--namespaces", 0);
    if namespaces > 0 {
        return pods::bench(
            namespaces,
            arg("--per-namespace", 100),
            arg("--mappers", 300),
            arg("--files", 20),
            runs,
        );
    }

    let t = Instant::now();
    let (mut child, clients) = open_connections(n)?;
    let setup_ms = ms(t.elapsed());

    // ss -tinp, best of 3.
    let mut ss_ms = f64::INFINITY;
    let mut ss_lines = 0usize;
    let mut ss_ok = true;
    for _ in 0..3 {
        let t = Instant::now();
        match Command::new("ss")
            .arg("-tinp")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        {
            Ok(out) => {
                ss_ms = ss_ms.min(ms(t.elapsed()));
                ss_lines = out.stdout.iter().filter(|b| **b == b'\n').count();
            }
            Err(e) => {
                eprintln!("ss not runnable ({e}): no comparison");
                ss_ok = false;
                break;
            }
        }
    }

    let cfg = NetConfig {
        include_loopback: true,
        ..NetConfig::default()
    };
    let t = Instant::now();
    let mut collector = NetCollector::new(&cfg);
    let new_ms = ms(t.elapsed());

    let cpu0 = thread_cpu_ns();
    let t = Instant::now();
    collector.sample(now_unix_ms());
    let cold_ms = ms(t.elapsed());
    let cold_cpu_ms = (thread_cpu_ns() - cpu0) as f64 / 1e6;
    let cold_walk = collector.owner_stats();
    let (_, status) = collector.take();
    anyhow::ensure!(
        status.sockets >= 2 * n,
        "the sample saw {} sockets, expected at least {}",
        status.sockets,
        2 * n
    );

    let (steady, steady_cpu) = steady_samples(&mut collector, runs);
    let walks_after = collector.owner_stats();
    let (_, status) = collector.take();

    // Churn: 100 new connections inside this process (which already holds N sockets), then one
    // sample: the owners of 200 new sockets are looked up (this pid first, memoised fds skipped).
    let churn = arg("--churn", 100);
    let local = TcpListener::bind("127.0.0.1:0")?;
    let mut fresh = Vec::with_capacity(2 * churn);
    for _ in 0..churn {
        fresh.push(TcpStream::connect(local.local_addr()?)?);
        fresh.push(local.accept()?.0);
    }
    let before = collector.owner_stats();
    let t = Instant::now();
    collector.sample(now_unix_ms());
    let churn_ms = ms(t.elapsed());
    let churn_walk = collector.owner_stats();
    let (_, churn_status) = collector.take();
    drop(fresh);
    let (best, median) = (steady[0], steady[steady.len() / 2]);
    let steady_cpu_median = steady_cpu[steady_cpu.len() / 2];

    // Burst: close every connection at once; count the destroy events that arrive.
    let t = Instant::now();
    drop(clients);
    drop(child.stdin.take());
    child.wait()?;
    let close_ms = ms(t.elapsed());
    let mut destroyed = 0u64;
    let mut overruns = 0u64;
    let mut closed_flows = 0u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        collector.sample(now_unix_ms());
        let (flows, s) = collector.take();
        destroyed += s.destroyed_seen;
        overruns += s.destroy_overruns;
        closed_flows += flows.iter().map(|f| u64::from(f.connections)).sum::<u64>();
        if destroyed >= 2 * n as u64 || Instant::now() > deadline {
            break;
        }
    }

    println!(
        "connections: {n} ({} sockets), set up in {setup_ms:.0} ms",
        2 * n
    );
    println!(
        "sample sockets: {} (unknown owners: {}), destroy events: {}",
        status.sockets, status.unknown_owners, status.destroy_events
    );
    println!("| what | wall ms | thread CPU ms |");
    println!("|---|---:|---:|");
    if ss_ok {
        println!("| ss -tinp (best of 3, {ss_lines} lines) | {ss_ms:.1} | (other process) |");
    }
    println!("| NetCollector::new | {new_ms:.1} | |");
    println!(
        "| cold sample ({} pids, {} links read) | {cold_ms:.1} | {cold_cpu_ms:.1} |",
        cold_walk.pids_walked, cold_walk.links_read
    );
    println!(
        "| steady sample, best of {runs} ({} walks) | {best:.1} | |",
        walks_after.walks - cold_walk.walks
    );
    println!("| steady sample, median of {runs} | {median:.1} | {steady_cpu_median:.1} |");
    println!(
        "| sample after {churn} new connections ({} pids, {} links read, unknown owners {}) | {churn_ms:.1} | |",
        churn_walk.pids_walked - before.pids_walked,
        churn_walk.links_read - before.links_read,
        churn_status.unknown_owners
    );
    println!(
        "burst: {} sockets closed in {close_ms:.0} ms; destroy events folded in: {destroyed} \
         ({:.1} %), overruns: {overruns}, connections in closing flows: {closed_flows}",
        2 * n,
        destroyed as f64 * 100.0 / (2 * n) as f64
    );
    println!(
        "{{\"bench\":\"flows\",\"connections\":{n},\"sockets\":{},\"ss_tinp_ms\":{},\"cold_ms\":{cold_ms:.1},\"cold_cpu_ms\":{cold_cpu_ms:.1},\"cold_links_read\":{},\"steady_best_ms\":{best:.1},\"steady_median_ms\":{median:.1},\"steady_cpu_median_ms\":{steady_cpu_median:.1},\"steady_walks\":{},\"churn_ms\":{churn_ms:.1},\"burst_sockets\":{},\"burst_destroy_events\":{destroyed},\"burst_overruns\":{overruns}}}",
        status.sockets,
        if ss_ok {
            format!("{ss_ms:.1}")
        } else {
            "null".to_owned()
        },
        cold_walk.links_read,
        walks_after.walks - cold_walk.walks,
        2 * n
    );
    if ss_ok {
        println!(
            "target cold sample <= ss -tinp ({ss_ms:.1} ms): {}; steady median <= ss -tinp / 4 ({:.1} ms): {}",
            if cold_ms <= ss_ms { "met" } else { "MISSED" },
            ss_ms / 4.0,
            if median <= ss_ms / 4.0 {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    Ok(())
}

/// `--namespaces N`: a node of pods (see the module documentation).
mod pods {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    use sov_agent::collect::net::{NetCollector, now_unix_ms};
    use sov_agent::collect::weights::inventory::{WeightsHandle, WeightsScanner};
    use sov_agent::config::{NetConfig, WeightsConfig};

    use super::{ms, thread_cpu_ns};

    /// One process per namespace: K connections over the namespace's loopback, held open.
    const HOLD: &str = r#"
import socket, sys
k = int(sys.argv[1])
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(k + 8)
port = l.getsockname()[1]
held = []
for _ in range(k):
    c = socket.create_connection(("127.0.0.1", port)); a, _ = l.accept()
    c.sendall(b"x" * 1024); a.recv(4096); a.sendall(b"y" * 1024); c.recv(4096)
    held += [c, a]
print("ready", flush=True)
sys.stdin.read()
"#;

    /// Map every file named in argv, then wait.
    const MAP: &str = r#"
import mmap, sys
maps = []
for p in sys.argv[1:]:
    f = open(p, "rb"); maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)); f.close()
print("ready", flush=True)
sys.stdin.read()
"#;

    struct Netns(String);

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// Children that end when their stdin closes (and are killed if they do not).
    struct Workers(Vec<Child>);

    impl Drop for Workers {
        fn drop(&mut self) {
            for c in &mut self.0 {
                drop(c.stdin.take());
            }
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    fn start(cmd: &mut Command) -> anyhow::Result<Child> {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        anyhow::ensure!(line.trim() == "ready", "worker said {line:?}");
        Ok(child)
    }

    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn safetensors(elements: usize, seed: u8) -> Vec<u8> {
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{elements}],"data_offsets":[0,{}]}}}}"#,
            elements * 4
        );
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend((0..elements * 4).map(|i| (i as u8).wrapping_mul(seed)));
        out
    }

    pub fn bench(
        namespaces: usize,
        per_ns: usize,
        mappers: usize,
        files: usize,
        runs: usize,
    ) -> anyhow::Result<()> {
        let rss_start = rss_kib();
        let me = std::process::id();
        let t = Instant::now();
        let mut spaces = Vec::with_capacity(namespaces);
        let mut workers = Workers(Vec::new());
        for i in 0..namespaces {
            let name = format!("sovbench{me}-{i}");
            let ok = Command::new("ip").args(["netns", "add", &name]).status()?;
            anyhow::ensure!(ok.success(), "ip netns add {name} failed (root needed)");
            spaces.push(Netns(name.clone()));
            Command::new("ip")
                .args(["-n", &name, "link", "set", "lo", "up"])
                .status()?;
            workers.0.push(start(
                Command::new("ip")
                    .args(["netns", "exec", &name, "python3", "-c", HOLD])
                    .arg(per_ns.to_string()),
            )?);
        }
        let dir = tempfile::tempdir()?;
        let paths: Vec<String> = (0..files)
            .map(|i| {
                let p = dir.path().join(format!("shard-{i:05}.safetensors"));
                std::fs::write(&p, safetensors(262_144 + i, i as u8 + 1))?;
                Ok(p.to_string_lossy().into_owned())
            })
            .collect::<anyhow::Result<_>>()?;
        for _ in 0..mappers {
            workers.0.push(start(
                Command::new("python3").args(["-c", MAP]).args(&paths),
            )?);
        }
        let setup_ms = ms(t.elapsed());

        // ss -tinp in every namespace (and the host's), one round, best of 3.
        let mut ss_round = f64::INFINITY;
        let mut ss_lines = 0usize;
        for _ in 0..3 {
            let t = Instant::now();
            let mut lines = 0;
            let host = Command::new("ss").arg("-tinp").output()?;
            lines += host.stdout.iter().filter(|b| **b == b'\n').count();
            for ns in &spaces {
                let out = Command::new("ip")
                    .args(["netns", "exec", &ns.0, "ss", "-tinp"])
                    .output()?;
                lines += out.stdout.iter().filter(|b| **b == b'\n').count();
            }
            ss_round = ss_round.min(ms(t.elapsed()));
            ss_lines = lines;
        }

        let rss_before_agent = rss_kib();
        let cfg = NetConfig {
            include_loopback: true,
            ..NetConfig::default()
        };
        let mut collector = NetCollector::new(&cfg);
        let cpu0 = thread_cpu_ns();
        let t = Instant::now();
        collector.sample(now_unix_ms());
        let cold_ms = ms(t.elapsed());
        let cold_cpu_ms = (thread_cpu_ns() - cpu0) as f64 / 1e6;
        let (_, status) = collector.take();
        anyhow::ensure!(
            status.namespaces > namespaces && status.sockets >= 2 * per_ns * namespaces,
            "the sample saw {} namespaces and {} sockets: {status:?}",
            status.namespaces,
            status.sockets
        );
        let (steady, steady_cpu) = super::steady_samples(&mut collector, runs);
        let (_, status) = collector.take();

        let empty = dir.path().join("no-root");
        std::fs::create_dir_all(&empty)?;
        let state = tempfile::tempdir()?;
        let handle = WeightsHandle::default();
        let mut scanner = WeightsScanner::new(
            WeightsConfig {
                roots: Some(vec![empty]),
                hash_rate_mb_per_sec: 0,
                ..WeightsConfig::default()
            },
            state.path(),
            handle.clone(),
        );
        let t = Instant::now();
        scanner.scan();
        scanner.refresh_users();
        scanner.hash_pending(&AtomicBool::new(false), &mut |_, _, _| {});
        let weights_cold_ms = ms(t.elapsed());
        let found = handle.files();
        let users: usize = found.iter().map(|f| f.users.len()).sum();
        let t = Instant::now();
        scanner.scan();
        scanner.refresh_users();
        let weights_steady_ms = ms(t.elapsed());
        let rss_after = rss_kib();

        let added_kib = rss_after.saturating_sub(rss_before_agent);
        println!(
            "node: {namespaces} network namespaces x {per_ns} connections, {mappers} processes \
             mapping {files} files; set up in {setup_ms:.0} ms"
        );
        println!(
            "sample: {} namespaces, {} sockets, {} unknown owners; weights: {} files, {users} users",
            status.namespaces,
            status.sockets,
            status.unknown_owners,
            found.len()
        );
        println!("| what | wall ms | thread CPU ms |");
        println!("|---|---:|---:|");
        println!(
            "| ss -tinp in every namespace, one round (best of 3, {ss_lines} lines) | {ss_round:.1} | (other processes) |"
        );
        println!(
            "| agent flow sample, cold (namespaces entered, owners looked up) | {cold_ms:.1} | {cold_cpu_ms:.1} |"
        );
        println!(
            "| agent flow sample, steady, best / median of {runs} | {:.1} / {:.1} | {:.1} |",
            steady[0],
            steady[steady.len() / 2],
            steady_cpu[steady_cpu.len() / 2]
        );
        println!("| weights scan + users + hashing, cold | {weights_cold_ms:.1} | |");
        println!("| weights scan + users, steady | {weights_steady_ms:.1} | |");
        println!(
            "RSS: {} KiB at start, {rss_before_agent} KiB before the agent's collectors, \
             {rss_after} KiB after: added {added_kib} KiB",
            rss_start
        );
        println!(
            "{{\"bench\":\"pods\",\"namespaces\":{namespaces},\"per_namespace\":{per_ns},\"mappers\":{mappers},\"files\":{files},\"ss_round_ms\":{ss_round:.1},\"cold_ms\":{cold_ms:.1},\"cold_cpu_ms\":{cold_cpu_ms:.1},\"steady_median_ms\":{:.1},\"steady_cpu_median_ms\":{:.1},\"weights_cold_ms\":{weights_cold_ms:.1},\"weights_steady_ms\":{weights_steady_ms:.1},\"added_rss_kib\":{added_kib}}}",
            steady[steady.len() / 2],
            steady_cpu[steady_cpu.len() / 2]
        );
        println!(
            "target steady sample <= ss -tinp in every namespace ({ss_round:.1} ms): {}; added RSS <= 10 MiB: {}",
            if steady[steady.len() / 2] <= ss_round {
                "met"
            } else {
                "MISSED"
            },
            if added_kib <= 10 * 1024 {
                "met"
            } else {
                "MISSED"
            }
        );
        drop(workers);
        drop(spaces);
        let _ = std::io::stdout().flush();
        Ok(())
    }
}
