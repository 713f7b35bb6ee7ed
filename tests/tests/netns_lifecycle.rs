//! Pods come and go: the flow sampler opens three netlink sockets inside each network namespace
//! it finds (sock_diag dump, destroy events, conntrack; on a helper thread that ends at once)
//! and holds its three counter files open (`sockstat`, `sockstat6`, `snmp`), and closes all six
//! once the namespace has no process left, so a node where pods churn leaks no descriptor and
//! no thread. Alone in its binary: it counts this process's descriptors and
//! threads.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sov_agent::collect::net::{NAMESPACE_GRACE_SAMPLES, NetCollector, now_unix_ms};
use sov_agent::config::NetConfig;
use sov_e2e::KillOnDrop;
use sov_e2e::netns::ip;

const PODS: usize = 5;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// A sleeping process in namespace `ns`.
fn pod_process(ns: &str) -> KillOnDrop {
    KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", ns, "sleep", "300"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn pods_come_and_go_without_leaking_descriptors_or_threads() {
    let names: Vec<String> = (0..PODS)
        .map(|i| format!("sovlife{}-{i}", std::process::id()))
        .collect();
    if let Err(e) = ip(&["netns", "add", &names[0]]) {
        eprintln!("SKIP pods_come_and_go: cannot create network namespaces here ({e})");
        return;
    }
    for n in &names[1..] {
        ip(&["netns", "add", n]).unwrap();
    }
    let mut c = NetCollector::new(&NetConfig::default());
    c.sample(now_unix_ms());
    let (_, status) = c.take();
    if status.mode != "netlink" {
        eprintln!(
            "SKIP pods_come_and_go: sock_diag netlink unavailable ({})",
            status.reason
        );
        for n in &names {
            let _ = ip(&["netns", "del", n]);
        }
        return;
    }
    let (base_ns, _) = c.namespace_count();
    let fds = count("/proc/self/fd");
    let threads = count("/proc/self/task");

    let mut pods: Vec<KillOnDrop> = names.iter().map(|n| pod_process(n)).collect();
    // `ip netns exec` has entered the namespace once the pid's ns link points elsewhere.
    let own = sov_agent::collect::namespaces::own("net");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pods.iter().any(|p| {
        sov_agent::collect::namespaces::of_pid(std::path::Path::new("/proc"), p.0.id(), "net")
            == own
    }) {
        assert!(
            Instant::now() < deadline,
            "pods did not enter their namespaces"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.sample(now_unix_ms());
    let (open, with_events) = c.namespace_count();
    assert_eq!(open, base_ns + PODS, "one observed namespace per pod");
    assert_eq!(
        with_events,
        base_ns + PODS,
        "each with its destroy-event socket"
    );
    assert_eq!(
        count("/proc/self/fd"),
        fds + 6 * PODS,
        "a dump socket, a destroy-event socket and a conntrack socket per namespace, and its \
         sockstat, sockstat6 and snmp held open"
    );
    assert_eq!(count("/proc/self/task"), threads, "no thread left behind");

    // The pods go: processes killed, namespaces deleted.
    for p in &mut pods {
        p.kill9();
    }
    for n in &names {
        ip(&["netns", "del", n]).unwrap();
    }
    for _ in 0..=NAMESPACE_GRACE_SAMPLES {
        c.sample(now_unix_ms());
    }
    assert_eq!(
        c.namespace_count().0,
        base_ns,
        "their namespaces are forgotten"
    );
    // The destroy listener lets go of a socket at its next wake-up, which removal causes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while count("/proc/self/fd") != fds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        count("/proc/self/fd"),
        fds,
        "every socket of theirs is closed"
    );
    assert_eq!(count("/proc/self/task"), threads);
}
