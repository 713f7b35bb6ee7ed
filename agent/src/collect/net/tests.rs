//! Collector tests over real sockets and real traffic on loopback (in this test process), and
//! over fake `/proc` trees for what a root test process cannot produce.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::*;

const MIB: u64 = 1024 * 1024;

fn loopback_cfg() -> NetConfig {
    NetConfig {
        include_loopback: true,
        ..NetConfig::default()
    }
}

fn within_1_percent(got: u64, want: u64) -> bool {
    got.abs_diff(want) * 100 <= want
}

/// A collector in netlink mode, or `None` (and a loud SKIP) where netlink is refused.
fn netlink_collector(cfg: &NetConfig, test: &str) -> Option<NetCollector> {
    let mut c = NetCollector::new(cfg);
    let (_, status) = c.take();
    if status.mode != MODE_NETLINK {
        eprintln!(
            "SKIP {test}: sock_diag netlink is not available here ({}); nothing to measure",
            status.reason
        );
        return None;
    }
    Some(c)
}

/// A server on `listener` that reads `inbound` bytes, answers `outbound` bytes, and returns its
/// stream (still open) and the listener (still listening).
fn echo_server(
    listener: TcpListener,
    inbound: u64,
    outbound: u64,
) -> std::thread::JoinHandle<(TcpStream, TcpListener)> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut left = inbound;
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "client closed early");
            left -= n as u64;
        }
        s.write_all(&vec![7u8; outbound as usize]).unwrap();
        (s, listener)
    })
}

/// Send `sent` bytes, read `received` bytes back, and keep both ends (and the listener) open.
fn transfer(ip: IpAddr, sent: u64, received: u64) -> (u16, TcpStream, (TcpStream, TcpListener)) {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = echo_server(listener, sent, received);
    let mut client = TcpStream::connect((ip, port)).unwrap();
    client.write_all(&vec![1u8; sent as usize]).unwrap();
    let mut back = vec![0u8; received as usize];
    client.read_exact(&mut back).unwrap();
    let server_side = server.join().unwrap();
    // Let the last ACKs land.
    std::thread::sleep(Duration::from_millis(100));
    (port, client, server_side)
}

fn outbound_to(flows: &[pb::Flow], addr: &str, port: u16) -> Vec<pb::Flow> {
    flows
        .iter()
        .filter(|f| {
            f.remote_address == addr
                && f.remote_port == u32::from(port)
                && f.direction == pb::Direction::Outbound as i32
        })
        .cloned()
        .collect()
}

fn inbound_on(flows: &[pb::Flow], port: u16) -> Vec<pb::Flow> {
    flows
        .iter()
        .filter(|f| f.local_port == u32::from(port) && f.direction == pb::Direction::Inbound as i32)
        .cloned()
        .collect()
}

fn one_open_connection_is_counted_each_way(ip: IpAddr, test: &str) {
    let Some(mut c) = netlink_collector(&loopback_cfg(), test) else {
        return;
    };
    let t0 = now_unix_ms();
    c.sample(t0);
    let (port, client, server) = transfer(ip, 3 * MIB, MIB);
    c.sample(t0 + 1000);
    let (flows, status) = c.take();
    assert_eq!(status.mode, MODE_NETLINK);
    let me = std::process::id();

    let out = outbound_to(&flows, &ip.to_string(), port);
    assert_eq!(
        out.len(),
        1,
        "one outbound flow to {ip}:{port} in {flows:#?}"
    );
    let f = &out[0];
    assert_eq!(f.protocol, pb::Protocol::Tcp as i32);
    assert_eq!(
        (f.pid, f.owner_unknown),
        (me, false),
        "owned by this test process"
    );
    assert!(f.bytes_known);
    // bytes_acked counts the SYN: one more than the payload.
    assert!(
        within_1_percent(f.bytes_sent, 3 * MIB),
        "sent {}",
        f.bytes_sent
    );
    assert!(
        within_1_percent(f.bytes_received, MIB),
        "received {}",
        f.bytes_received
    );
    assert_eq!(f.connections, 1);
    assert!(f.min_rtt_us > 0 && f.smoothed_rtt_us > 0, "rtt {f:?}");
    assert_eq!(f.local_address, ip.to_string());
    assert_eq!(f.local_port, 0, "aggregated over local ports");
    assert_eq!((f.start_unix_ms, f.end_unix_ms), (t0, t0 + 1000));

    let inb = inbound_on(&flows, port);
    assert_eq!(
        inb.len(),
        1,
        "the accepted socket is one inbound flow: {flows:#?}"
    );
    assert_eq!(inb[0].pid, me);
    assert_eq!(inb[0].remote_port, 0, "client ports aggregated");
    assert!(within_1_percent(inb[0].bytes_received, 3 * MIB));
    assert!(within_1_percent(inb[0].bytes_sent, MIB));
    drop((client, server));
}

#[test]
fn an_open_ipv4_connection_is_one_outbound_flow_with_its_bytes_and_the_accepted_side_is_inbound() {
    one_open_connection_is_counted_each_way(
        IpAddr::from([127, 0, 0, 1]),
        "an_open_ipv4_connection_is_one_outbound_flow",
    );
}

#[test]
fn an_open_ipv6_connection_on_loopback_is_counted_the_same_way() {
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIP an_open_ipv6_connection_on_loopback: ::1 is not available on this machine");
        return;
    }
    one_open_connection_is_counted_each_way(
        "::1".parse().unwrap(),
        "an_open_ipv6_connection_on_loopback",
    );
}

#[test]
fn a_connection_opened_and_closed_between_two_samples_is_counted_through_destroy_events() {
    let test = "a_connection_opened_and_closed_between_two_samples";
    let Some(mut c) = netlink_collector(&loopback_cfg(), test) else {
        return;
    };
    let (_, status) = c.take();
    if !status.destroy_events {
        eprintln!(
            "SKIP {test}: NOT SUBSCRIBED to sock_diag destroy events ({}); a connection that \
             opens and closes between two samples cannot be seen on this machine",
            status.reason
        );
        return;
    }
    c.sample(now_unix_ms());

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        // `s` is dropped here: the server closes its side after the client's FIN; the listener
        // goes on listening.
        (got.len(), listener)
    });
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client.write_all(&vec![3u8; MIB as usize]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (got, _listener) = server.join().unwrap();
    assert_eq!(got as u64, MIB);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    drop(client);

    // Both ends closed; the kernel frees the sockets and announces them within milliseconds.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut flows = Vec::new();
    let mut destroyed = 0;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        c.sample(now_unix_ms());
        let (f, s) = c.take();
        destroyed += s.destroyed_seen;
        flows.extend(f);
        let done = outbound_to(&flows, "127.0.0.1", port)
            .iter()
            .map(|f| f.bytes_sent)
            .sum::<u64>()
            >= MIB
            && inbound_on(&flows, port)
                .iter()
                .map(|f| f.bytes_received)
                .sum::<u64>()
                >= MIB;
        if done || Instant::now() > deadline {
            break;
        }
    }
    assert!(
        destroyed >= 2,
        "two destroy events at least, saw {destroyed}"
    );
    let out = outbound_to(&flows, "127.0.0.1", port);
    assert_eq!(out.len(), 1, "{flows:#?}");
    // SYN and FIN count one byte each.
    assert!(
        within_1_percent(out[0].bytes_sent, MIB),
        "sent {}",
        out[0].bytes_sent
    );
    assert!(
        out[0].owner_unknown && out[0].pid == 0,
        "opened and closed between samples"
    );
    assert_eq!(out[0].connections, 1);
    assert!(
        out[0].start_unix_ms < out[0].end_unix_ms,
        "the interval since the sample before"
    );
    let inb = inbound_on(&flows, port);
    assert_eq!(inb.len(), 1);
    assert!(within_1_percent(inb[0].bytes_received, MIB));
}

#[test]
fn loopback_traffic_is_left_out_when_include_loopback_is_false() {
    let cfg = NetConfig::default();
    assert!(!cfg.include_loopback);
    let Some(mut c) = netlink_collector(&cfg, "loopback_traffic_is_left_out") else {
        return;
    };
    c.sample(now_unix_ms());
    let (port, client, server) = transfer(IpAddr::from([127, 0, 0, 1]), 256 * 1024, 1024);
    c.sample(now_unix_ms());
    let (flows, _) = c.take();
    assert!(
        outbound_to(&flows, "127.0.0.1", port).is_empty(),
        "{flows:#?}"
    );
    assert!(inbound_on(&flows, port).is_empty());
    assert!(
        flows
            .iter()
            .all(|f| !f.remote_address.starts_with("127.") && f.remote_address != "::1"),
        "no loopback flow at all"
    );
    drop((client, server));
}

/// The socket inode behind descriptor `fd` of this process.
fn inode_of(fd: &impl std::os::fd::AsRawFd) -> u32 {
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    owners::parse_socket_link(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str())).unwrap()
}

#[test]
fn the_owner_of_a_connection_left_out_of_the_flows_is_not_searched_for() {
    let cfg = NetConfig::default();
    let Some(mut c) = netlink_collector(&cfg, "owner_of_a_left_out_connection") else {
        return;
    };
    c.sample(now_unix_ms());
    let (port, client, (server, listener)) =
        transfer(IpAddr::from([127, 0, 0, 1]), 64 * 1024, 1024);
    c.sample(now_unix_ms());
    let (client_ino, server_ino) = (inode_of(&client), inode_of(&server));
    assert_eq!(c.owners.owner(client_ino), None, "loopback: never reported");
    assert_eq!(c.owners.owner(server_ino), None);
    assert_eq!(
        c.owners.owner(inode_of(&listener)),
        Some(std::process::id()),
        "a listener's owner is still looked for"
    );
    let (flows, _) = c.take();
    assert!(inbound_on(&flows, port).is_empty(), "{flows:#?}");

    // Where loopback is a flow, the same connection's owner is found.
    let Some(mut c) = netlink_collector(&loopback_cfg(), "owner_of_a_left_out_connection") else {
        return;
    };
    c.sample(now_unix_ms());
    assert_eq!(c.owners.owner(client_ino), Some(std::process::id()));
    assert_eq!(c.owners.owner(server_ino), Some(std::process::id()));
    drop((client, server, listener));
}

#[test]
fn a_forced_fallback_reads_proc_net_and_reports_flows_without_bytes() {
    let mut c = NetCollector::with_options(
        &loopback_cfg(),
        Options {
            force_proc_fallback: true,
            proc_root: PathBuf::from(DEFAULT_PROC_ROOT),
        },
    );
    let (_, status) = c.take();
    assert_eq!(status.mode, MODE_PROC_FALLBACK);
    assert!(status.reason.contains("forced"), "{}", status.reason);
    assert!(!status.destroy_events);
    let (port, client, server) = transfer(IpAddr::from([127, 0, 0, 1]), 64 * 1024, 1024);
    c.sample(now_unix_ms());
    c.sample(now_unix_ms());
    let (flows, status) = c.take();
    assert_eq!(status.mode, MODE_PROC_FALLBACK);
    assert!(status.sockets >= 3, "listener, client and accepted socket");
    let out = outbound_to(&flows, "127.0.0.1", port);
    assert_eq!(out.len(), 1, "{port} {flows:#?}");
    assert!(!out[0].bytes_known);
    assert_eq!((out[0].bytes_sent, out[0].bytes_received), (0, 0));
    assert_eq!(out[0].pid, std::process::id());
    assert_eq!(out[0].connections, 1);
    assert_eq!(inbound_on(&flows, port).len(), 1);
    drop((client, server));
}

#[test]
fn a_socket_whose_owner_cannot_be_seen_is_reported_as_owner_unknown_not_dropped() {
    let root = tempfile::tempdir().unwrap();
    let net = root.path().join("net");
    std::fs::create_dir_all(&net).unwrap();
    // A listener on 10.0.2.15:8080 and an established connection 10.0.2.15:50010 →
    // 192.0.2.10:443 (inode 4242) that no process directory holds.
    std::fs::write(
        net.join("tcp"),
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0F02000A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0000000000000000 100 0 0 10 0
   1: 0F02000A:C35A 0A0200C0:01BB 01 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 20 4 30 10 -1
",
    )
    .unwrap();
    let fd = root.path().join("77").join("fd");
    std::fs::create_dir_all(&fd).unwrap();
    std::os::unix::fs::symlink("socket:[1111]", fd.join("3")).unwrap();
    let mut c = NetCollector::with_options(
        &NetConfig::default(),
        Options {
            force_proc_fallback: true,
            proc_root: root.path().to_path_buf(),
        },
    );
    c.sample(1000);
    c.sample(2000);
    let (flows, status) = c.take();
    assert_eq!(status.sockets, 2);
    assert_eq!(
        status.unknown_owners, 1,
        "the connection; the listener belongs to pid 77"
    );
    assert_eq!(flows.len(), 1, "{flows:#?}");
    let f = &flows[0];
    if cfg!(target_endian = "little") {
        assert_eq!(f.remote_address, "192.0.2.10");
        assert_eq!(f.remote_port, 443);
    }
    assert_eq!((f.pid, f.owner_unknown), (0, true));
    assert!(!f.bytes_known);
    assert_eq!(f.direction, pb::Direction::Outbound as i32);
    assert_eq!((f.start_unix_ms, f.end_unix_ms), (1000, 2000));
}

#[test]
fn a_missing_proc_net_is_a_sample_error_with_its_reason() {
    let root = tempfile::tempdir().unwrap();
    let mut c = NetCollector::with_options(
        &NetConfig::default(),
        Options {
            force_proc_fallback: true,
            proc_root: root.path().to_path_buf(),
        },
    );
    c.sample(1000);
    let (flows, status) = c.take();
    assert!(flows.is_empty());
    assert_eq!(status.sample_errors, 1);
    assert!(status.reason.contains("net/tcp"), "{}", status.reason);
    let (_, status) = c.take();
    assert_eq!(status.sample_errors, 0, "counters are per take");
}

#[test]
fn a_disabled_collector_reports_disabled_and_nothing_else() {
    let cfg = NetConfig {
        enabled: false,
        ..NetConfig::default()
    };
    let mut c = NetCollector::new(&cfg);
    c.sample(1000);
    c.sample(2000);
    let (flows, status) = c.take();
    assert!(flows.is_empty());
    assert_eq!(status.mode, MODE_DISABLED);
}

#[test]
fn the_sampling_thread_feeds_the_handle_and_stops_when_told() {
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = NetConfig {
        interval_secs: 1,
        ..loopback_cfg()
    };
    let (handle, thread) = NetHandle::spawn(cfg, stop.clone()).unwrap();
    // Wait for the baseline sample: traffic before it is not counted.
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.take().1.sockets == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (port, client, server) = transfer(IpAddr::from([127, 0, 0, 1]), 128 * 1024, 1024);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut flows = Vec::new();
    while Instant::now() < deadline && outbound_to(&flows, "127.0.0.1", port).is_empty() {
        std::thread::sleep(Duration::from_millis(100));
        flows.extend(handle.take().0);
    }
    let (_, status) = handle.take();
    assert!(
        status.mode == MODE_NETLINK || status.mode == MODE_PROC_FALLBACK,
        "{status:?}"
    );
    assert_eq!(
        outbound_to(&flows, "127.0.0.1", port).len(),
        1,
        "{flows:#?}"
    );
    let asked = Instant::now();
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "stops within one absorb period"
    );
    drop((client, server));
}

#[test]
fn pids_lists_the_owners_of_pending_flows() {
    let Some(mut c) = netlink_collector(&loopback_cfg(), "pids_lists_the_owners") else {
        return;
    };
    c.sample(now_unix_ms());
    let (_port, client, server) = transfer(IpAddr::from([127, 0, 0, 1]), 64 * 1024, 1024);
    c.sample(now_unix_ms());
    let h = c.handle();
    assert!(h.pids().contains(&std::process::id()));
    let _ = c.take();
    assert!(h.pids().is_empty(), "nothing pending after a take");
    drop((client, server));
}

#[test]
fn a_dual_stack_socket_reports_its_ipv4_mapped_peer_as_ipv4_text() {
    let Some(mut c) = netlink_collector(&loopback_cfg(), "a_dual_stack_socket") else {
        return;
    };
    let Ok(listener) = TcpListener::bind("[::]:0") else {
        eprintln!("SKIP a_dual_stack_socket: no IPv6 on this machine");
        return;
    };
    let port = listener.local_addr().unwrap().port();
    c.sample(now_unix_ms());
    let server = echo_server(listener, 4096, 4096);
    let Ok(mut client) = TcpStream::connect(("127.0.0.1", port)) else {
        eprintln!("SKIP a_dual_stack_socket: the [::] listener is IPv6-only (bindv6only = 1)");
        return;
    };
    client.write_all(&[1u8; 4096]).unwrap();
    client.read_exact(&mut [0u8; 4096]).unwrap();
    let kept = server.join().unwrap();
    c.sample(now_unix_ms());
    let (flows, _) = c.take();
    // The accepted socket is AF_INET6 with peer ::ffff:127.0.0.1.
    let inb = inbound_on(&flows, port);
    assert_eq!(inb.len(), 1, "{flows:#?}");
    assert_eq!(inb[0].remote_address, "127.0.0.1");
    assert_eq!(inb[0].local_address, "127.0.0.1");
    drop((client, kept));
}

#[test]
fn a_namespace_belongs_to_its_one_container_or_to_its_one_pod_else_to_nobody() {
    let c = |id: &str, pod: &str| pb::ContainerRef {
        id: id.into(),
        pod_uid: pod.into(),
        image: format!("img-{id}"),
        container_name: format!("name-{id}"),
        ..Default::default()
    };
    let (a1, a1_again, a2, b) = (
        c("a1", "pod-a"),
        c("a1", "pod-a"),
        c("a2", "pod-a"),
        c("b", "pod-b"),
    );
    let one = common_owner([Some(&a1), Some(&a1_again)].into_iter()).expect("one container");
    assert_eq!((one.id.as_str(), one.image.as_str()), ("a1", "img-a1"));
    let pod = common_owner([Some(&a1), Some(&a2)].into_iter()).expect("one pod");
    assert_eq!(pod.pod_uid, "pod-a");
    assert!(pod.id.is_empty() && pod.image.is_empty() && pod.container_name.is_empty());
    assert_eq!(
        common_owner([Some(&a1), Some(&b)].into_iter()),
        None,
        "two pods"
    );
    assert_eq!(
        common_owner([Some(&a1), None].into_iter()),
        None,
        "a host process too"
    );
    assert_eq!(common_owner(std::iter::empty()), None);
}

#[test]
fn processes_and_connections_started_and_killed_at_a_high_rate_keep_every_byte_and_owner() {
    // Child processes (bash, /dev/tcp) each connect to this test's listener and send a
    // distinct number of bytes; half close at once (between samples: owner unknown, bytes from
    // the destroy events), half hold the connection across samples (owner known: the child).
    // Meanwhile the collector samples every 100 ms with the shared process table. Every byte
    // must be counted, and every byte with an owner must be owned by the child that sent it.
    let test = "processes_and_connections_started_and_killed_at_a_high_rate";
    let Some(c) = netlink_collector(&loopback_cfg(), test) else {
        return;
    };
    if !std::path::Path::new("/bin/bash").exists() {
        crate::skipped::record(&format!("collect::net::tests::{test}"), "no /bin/bash");
        return;
    }
    let table = crate::collect::proctable::ProcTable::new(std::path::Path::new("/proc"));
    let mut c = c.with_table(table);
    let (_, status) = c.take();
    if !status.destroy_events {
        eprintln!("SKIP {test}: no destroy events here ({})", status.reason);
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let children = 40u64;
    let server = std::thread::spawn(move || {
        let mut total = 0u64;
        let mut readers = Vec::new();
        for _ in 0..children {
            let (mut s, _) = listener.accept().unwrap();
            readers.push(std::thread::spawn(move || {
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                got.len() as u64
            }));
        }
        for r in readers {
            total += r.join().unwrap();
        }
        total
    });
    c.sample(now_unix_ms());
    let mut sent: HashMap<u32, (u64, bool)> = HashMap::new();
    let mut running = Vec::new();
    let mut flows = Vec::new();
    for i in 0..children {
        let bytes = 10_000 + i * 997;
        let hold = i % 2 == 0;
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port}; head -c {bytes} /dev/zero >&3; {} exec 3>&-",
            if hold { "sleep 0.4;" } else { "" }
        );
        let child = std::process::Command::new("/bin/bash")
            .args(["-c", &script])
            .spawn()
            .unwrap();
        sent.insert(child.id(), (bytes, hold));
        running.push(child);
        if i % 4 == 3 {
            std::thread::sleep(Duration::from_millis(100));
            c.sample(now_unix_ms());
            flows.extend(c.take().0);
        }
    }
    for mut ch in running {
        assert!(ch.wait().unwrap().success());
    }
    let total_sent: u64 = sent.values().map(|(b, _)| b).sum();
    assert_eq!(server.join().unwrap(), total_sent);
    // The last destroy events arrive within milliseconds of the closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    let counted = |flows: &[pb::Flow]| -> u64 {
        outbound_to(flows, "127.0.0.1", port)
            .iter()
            .map(|f| f.bytes_sent)
            .sum()
    };
    // SYN and FIN count one byte each in bytes_acked.
    let want = total_sent + 2 * children;
    while counted(&flows) < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        c.sample(now_unix_ms());
        flows.extend(c.take().0);
    }
    let out = outbound_to(&flows, "127.0.0.1", port);
    assert_eq!(counted(&flows), want, "every byte counted: {out:#?}");
    let mut by_pid: HashMap<u32, u64> = HashMap::new();
    for f in &out {
        if !f.owner_unknown {
            *by_pid.entry(f.pid).or_default() += f.bytes_sent;
        }
    }
    for (pid, bytes) in &by_pid {
        let (want, _) = sent
            .get(pid)
            .unwrap_or_else(|| panic!("bytes owned by {pid}, not one of the children: {out:#?}"));
        assert!(
            *bytes <= want + 2,
            "{pid} owns {bytes} bytes but sent {want}"
        );
    }
    let held_owned = sent
        .iter()
        .filter(|(pid, (_, hold))| *hold && by_pid.contains_key(pid))
        .count();
    assert!(
        held_owned > 0,
        "children that held their connection across a sample are attributed: {by_pid:?}"
    );
}
