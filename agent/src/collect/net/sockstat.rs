//! Which protocols a network namespace holds sockets of, from its `/proc/<pid>/net/sockstat`
//! and `sockstat6` (`TCP: inuse N`, `UDP: inuse N`, `TCP6: inuse N`, `UDP6: inuse N`: the
//! namespace's own counters), so that a dump is asked only for a protocol the namespace has a
//! socket of.
//!
//! Why: a sock_diag dump walks the node-wide socket hash tables whatever the namespace holds
//! (the TCP established table has 2^18 buckets on the 24 GB development VM, and the IPv4 and
//! IPv6 dumps both walk it), so four dumps of an empty namespace cost about a millisecond of
//! kernel time; reading the two files costs a few tens of microseconds. A socket created
//! between the read and the dump is seen at the next sample with its full counters (a socket
//! new to the tracker contributes everything it counted), and one that closes meanwhile is
//! announced by its destroy event, so skipping a protocol that had no socket loses nothing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Sockets in use per dumped protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InUse {
    pub tcp4: u64,
    pub udp4: u64,
    pub tcp6: u64,
    pub udp6: u64,
}

impl InUse {
    /// Whether the dump of (`AF_INET` or `AF_INET6`, TCP or UDP) can hold anything.
    pub fn any(&self, v6: bool, tcp: bool) -> bool {
        match (v6, tcp) {
            (false, true) => self.tcp4 > 0,
            (false, false) => self.udp4 > 0,
            (true, true) => self.tcp6 > 0,
            (true, false) => self.udp6 > 0,
        }
    }
}

/// A namespace's `sockstat`, `sockstat6` and `snmp`, kept open and read again with `pread`: no
/// walk of `/proc/<pid>/net/…` per sample (three opens, reads and closes a namespace and
/// sample were 65–90 µs of a node of pods' 100 namespaces; held, 25–30 µs: docs/PERFORMANCE.md
/// §3b). A file of `/proc/<pid>/net` belongs to the network namespace itself (the kernel takes
/// a reference on it at open), not to the process: it reads that namespace's counters after
/// the process exits, and a reused pid cannot point it at another namespace. It also keeps the
/// namespace alive while held, as the namespace's netlink sockets already do; both are closed
/// when the namespace is (`NetCollector::discover`).
#[derive(Debug)]
pub struct NetFiles {
    sockstat: File,
    sockstat6: File,
    /// `None` where it could not be opened: the counters alone still say which protocols to
    /// dump (and no mark is taken: every TCP dump is made).
    snmp: Option<File>,
}

impl NetFiles {
    /// The files of the `net` directory `net_dir` (`/proc/self/net` for the agent's own).
    pub fn open(net_dir: &Path) -> Option<Self> {
        Some(Self {
            sockstat: File::open(net_dir.join("sockstat")).ok()?,
            sockstat6: File::open(net_dir.join("sockstat6")).ok()?,
            snmp: File::open(net_dir.join("snmp")).ok(),
        })
    }

    /// The files of network namespace `inode`, through process `pid` of `proc_root`: opened
    /// relative to the process's directory (which stays that process's, whatever reuses its
    /// pid), and kept only when the process is still in `inode` after they were opened.
    pub fn open_in(proc_root: &Path, pid: u32, inode: u64) -> Option<Self> {
        use rustix::fs::{Mode, OFlags};
        let dir = rustix::fs::open(
            proc_root.join(pid.to_string()),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let at = |name: &str| -> Option<File> {
            rustix::fs::openat(&dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
                .ok()
                .map(File::from)
        };
        let files = Self {
            sockstat: at("net/sockstat")?,
            sockstat6: at("net/sockstat6")?,
            snmp: at("net/snmp"),
        };
        let link = rustix::fs::readlinkat(&dir, "ns/net", Vec::new()).ok()?;
        let now = crate::collect::namespaces::parse_link(
            crate::collect::namespaces::NET,
            link.as_bytes(),
        )?;
        (now == inode).then_some(files)
    }

    /// The namespace's counters now; `None` when a file cannot be read or a counter is
    /// missing. `buf` is scratch space, kept between calls.
    pub fn in_use(&self, buf: &mut Vec<u8>) -> Option<InUse> {
        let v4 = read_whole(&self.sockstat, buf)?;
        let (tcp4, udp4) = (inuse(v4, "TCP:")?, inuse(v4, "UDP:")?);
        let v6 = read_whole(&self.sockstat6, buf)?;
        Some(InUse {
            tcp4,
            udp4,
            tcp6: inuse(v6, "TCP6:")?,
            udp6: inuse(v6, "UDP6:")?,
        })
    }

    /// The text of the namespace's `snmp` now, in `buf`.
    pub fn snmp<'b>(&self, buf: &'b mut Vec<u8>) -> Option<&'b str> {
        read_whole(self.snmp.as_ref()?, buf)
    }
}

/// The whole text of `file` from its start, read with `pread` into `buf`. Each of these files is
/// one record the kernel makes at once, so a read that leaves room in `buf` has it all (a
/// second `pread` to see the end would make the record again).
fn read_whole<'b>(file: &File, buf: &'b mut Vec<u8>) -> Option<&'b str> {
    const FIRST: usize = 4096;
    const MOST: usize = 1 << 20;
    buf.clear();
    buf.resize(FIRST, 0);
    let mut len = 0;
    loop {
        let n = file.read_at(buf.get_mut(len..)?, len as u64).ok()?;
        len += n;
        if n == 0 || len < buf.len() {
            break;
        }
        if buf.len() >= MOST {
            return None;
        }
        buf.resize(buf.len() * 2, 0);
    }
    buf.truncate(len);
    std::str::from_utf8(buf).ok()
}

/// The counters of the namespace whose `net` directory is `net_dir` (`/proc/<pid>/net`);
/// `None` when a file cannot be read or a counter is missing (then everything is dumped).
#[cfg(test)] // the sampler reads held files (NetFiles)
pub fn read(net_dir: &Path) -> Option<InUse> {
    NetFiles::open(net_dir)?.in_use(&mut Vec::new())
}

/// What a namespace's TCP did, from its `/proc/<pid>/net/snmp` (`Tcp:` counters, both address
/// families together) and its TCP `inuse` counts: while this is unchanged (and no socket of it
/// was destroyed), its TCP sockets are the same ones as at the previous dump — a connection
/// counts in `ActiveOpens` (`connect`) or `PassiveOpens` (`accept`) of the namespace it lives
/// in, a listener changes `inuse` — and no byte moved over any of them while `InSegs` is
/// unchanged (a sent byte counts in `bytes_acked` only once its ACK came in).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpMark {
    /// `inuse` of TCP and TCP6 (hashed sockets: listeners and connections).
    pub inuse: (u64, u64),
    /// `ActiveOpens` and `PassiveOpens`.
    pub opens: (u64, u64),
    /// `InSegs`.
    pub in_segs: u64,
}

impl TcpMark {
    /// The same sockets as at `earlier` (whether bytes moved is [`TcpMark::in_segs`]).
    pub fn same_sockets(&self, earlier: &TcpMark) -> bool {
        self.inuse == earlier.inuse && self.opens == earlier.opens
    }

    /// Whether the namespace's TCP hash table holds no socket that no sample has seen, given
    /// its mark `earlier` (read before its latest dump or steady sample) and the TCP sockets
    /// that left the table since as their destroy events tell (`closes`): every open since is
    /// a connection already closed unseen, and `inuse` fell by the known sockets that closed.
    /// A listener or a socket closed before `connect` (`closes.other`) makes it false (what
    /// it did to `inuse` is not known). Exact when every event of a socket that left the table
    /// before the mark was read has been counted; an event still on its way only makes it
    /// false (a dump), unless it is balanced by exactly one new connection (see
    /// `NetCollector::sample`, which bounds that by a dump at least every
    /// [`super::LEDGER_DUMP_EVERY`]).
    pub fn accounts_for(&self, earlier: &TcpMark, closes: &super::flows::TcpCloses) -> bool {
        let opens = |m: &TcpMark| m.opens.0.checked_add(m.opens.1);
        let inuse = |m: &TcpMark| m.inuse.0.checked_add(m.inuse.1);
        let expected_opens = opens(earlier).and_then(|o| o.checked_add(closes.unseen));
        let inuse_then = inuse(self).and_then(|i| i.checked_add(closes.known));
        closes.other == 0
            && expected_opens.is_some()
            && opens(self) == expected_opens
            && inuse_then.is_some()
            && inuse_then == inuse(earlier)
    }
}

/// The [`TcpMark`] of the namespace whose `net` directory is `net_dir`, given its `inuse`
/// counters; `None` when `snmp` cannot be read or lacks a counter.
#[cfg(test)] // the sampler reads held files (NetFiles)
pub fn tcp_mark(net_dir: &Path, inuse: &InUse) -> Option<TcpMark> {
    let snmp = std::fs::read_to_string(net_dir.join("snmp")).ok()?;
    mark_of(&snmp, inuse)
}

/// The [`TcpMark`] from the text of a `snmp` file and the `inuse` counters.
pub fn mark_of(snmp: &str, inuse: &InUse) -> Option<TcpMark> {
    let mut lines = snmp.lines().filter_map(|l| l.strip_prefix("Tcp:"));
    let names: Vec<&str> = lines.next()?.split_ascii_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_ascii_whitespace().collect();
    let get = |name: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse().ok()
    };
    Some(TcpMark {
        inuse: (inuse.tcp4, inuse.tcp6),
        opens: (get("ActiveOpens")?, get("PassiveOpens")?),
        in_segs: get("InSegs")?,
    })
}

/// `N` of the line `<label> inuse N …`.
fn inuse(text: &str, label: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix(label))?;
    let mut words = rest.split_ascii_whitespace();
    while let Some(w) = words.next() {
        if w == "inuse" {
            return words.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_per_protocol_and_a_missing_one_means_unknown() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("sockstat"),
            "sockets: used 58\nTCP: inuse 11 orphan 0 tw 242 alloc 14 mem 298\nUDP: inuse 0 mem 0\nUDPLITE: inuse 0\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("sockstat6"),
            "TCP6: inuse 2\nUDP6: inuse 0\nUDPLITE6: inuse 0\n",
        )
        .unwrap();
        let u = read(dir.path()).unwrap();
        assert_eq!(
            u,
            InUse {
                tcp4: 11,
                udp4: 0,
                tcp6: 2,
                udp6: 0
            }
        );
        assert!(
            u.any(false, true) && !u.any(false, false) && u.any(true, true) && !u.any(true, false)
        );
        std::fs::write(dir.path().join("sockstat6"), "TCP6: inuse 2\n").unwrap();
        assert_eq!(read(dir.path()), None);
    }

    #[test]
    fn the_tcp_mark_reads_opens_and_segments_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("snmp"),
            "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
             Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs\n\
             Tcp: 1 200 120000 -1 92 54 11 18 9 12262 7845\n\
             Udp: InDatagrams NoPorts\nUdp: 5 6\n",
        )
        .unwrap();
        let inuse = InUse {
            tcp4: 3,
            udp4: 0,
            tcp6: 1,
            udp6: 0,
        };
        let m = tcp_mark(dir.path(), &inuse).unwrap();
        assert_eq!(
            m,
            TcpMark {
                inuse: (3, 1),
                opens: (92, 54),
                in_segs: 12262
            }
        );
        std::fs::write(dir.path().join("snmp"), "Tcp: ActiveOpens\nTcp: 1\n").unwrap();
        assert_eq!(tcp_mark(dir.path(), &inuse), None, "no PassiveOpens");
    }

    #[test]
    fn a_connection_changes_this_namespaces_tcp_mark() {
        let net = Path::new("/proc/self/net");
        let mark = || tcp_mark(net, &read(net).unwrap()).expect("snmp of this namespace");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let before = mark();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let after = mark();
        assert!(!after.same_sockets(&before), "{before:?} {after:?}");
        assert!(after.opens.0 > before.opens.0 && after.opens.1 > before.opens.1);
        drop((c, a));
    }

    #[test]
    fn held_files_read_fresh_counters_at_every_read() {
        let net = Path::new("/proc/self/net");
        let files = NetFiles::open(net).expect("this namespace's net files");
        let mut buf = Vec::new();
        let before = files.in_use(&mut buf).expect("counters");
        let opens_before = files
            .snmp(&mut buf)
            .and_then(crate::collect::net::glance::parse_opens)
            .expect("TCP opens");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        // The same open files, read again: what the listener and the connection changed.
        let after = files.in_use(&mut buf).unwrap();
        assert!(after.tcp4 > before.tcp4, "{before:?} {after:?}");
        let opens_after = files
            .snmp(&mut buf)
            .and_then(crate::collect::net::glance::parse_opens)
            .unwrap();
        assert!(
            opens_after >= opens_before + 2,
            "{opens_before} -> {opens_after}"
        );
        assert_eq!(
            files.in_use(&mut buf),
            read(net),
            "held and freshly opened files agree while nothing changes"
        );
        drop((c, a, l));
    }

    #[test]
    fn files_held_through_a_process_stay_with_its_namespace_after_it_exits() {
        use crate::collect::namespaces;
        let own = namespaces::own(namespaces::NET).expect("own namespace");
        let mut child = match std::process::Command::new("unshare")
            .args(["--net", "--", "sleep", "30"])
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "SKIP files_held_through_a_process_stay_with_its_namespace: no unshare ({e})"
                );
                return;
            }
        };
        let proc_root = Path::new("/proc");
        // Until `unshare` has made the namespace and exec'd `sleep` (bounded: 10 s).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let ino = loop {
            match namespaces::of_pid(proc_root, child.id(), namespaces::NET) {
                Some(ino) if ino != own => break Some(ino),
                _ if child.try_wait().ok().flatten().is_some() => break None,
                _ if std::time::Instant::now() > deadline => break None,
                _ => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        let Some(ino) = ino else {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "SKIP files_held_through_a_process_stay_with_its_namespace: cannot make a \
                 network namespace here (not root?)"
            );
            return;
        };
        assert!(
            NetFiles::open_in(proc_root, child.id(), ino + 1).is_none(),
            "a process not in the namespace asked for gives no files"
        );
        let files = NetFiles::open_in(proc_root, child.id(), ino).expect("its files");
        let _l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut buf = Vec::new();
        let empty = InUse::default();
        assert_eq!(
            files.in_use(&mut buf),
            Some(empty),
            "its own counters, not ours"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(NetFiles::open_in(proc_root, child.id(), ino).is_none());
        assert_eq!(
            files.in_use(&mut buf),
            Some(empty),
            "read after its last process exited: the files hold the namespace"
        );
        assert!(files.snmp(&mut buf).is_some_and(|t| t.contains("Tcp:")));
    }

    #[test]
    fn a_new_namespace_has_no_socket_and_a_listener_shows_in_this_one() {
        let own = read(Path::new("/proc/self/net")).expect("sockstat of this namespace");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let with = read(Path::new("/proc/self/net")).unwrap();
        assert!(with.tcp4 > 0 && with.tcp4 >= own.tcp4, "{own:?} {with:?}");
        drop(l);
    }
}
