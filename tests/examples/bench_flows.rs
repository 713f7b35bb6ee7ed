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

    let mut steady = Vec::with_capacity(runs);
    let mut steady_cpu = Vec::with_capacity(runs);
    for _ in 0..runs {
        let cpu0 = thread_cpu_ns();
        let t = Instant::now();
        collector.sample(now_unix_ms());
        steady.push(ms(t.elapsed()));
        steady_cpu.push((thread_cpu_ns() - cpu0) as f64 / 1e6);
    }
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
    steady.sort_by(f64::total_cmp);
    steady_cpu.sort_by(f64::total_cmp);
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
