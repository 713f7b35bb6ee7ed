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

/// The counters of the namespace whose `net` directory is `net_dir` (`/proc/<pid>/net`);
/// `None` when a file cannot be read or a counter is missing (then everything is dumped).
pub fn read(net_dir: &Path) -> Option<InUse> {
    let v4 = std::fs::read_to_string(net_dir.join("sockstat")).ok()?;
    let v6 = std::fs::read_to_string(net_dir.join("sockstat6")).ok()?;
    Some(InUse {
        tcp4: inuse(&v4, "TCP:")?,
        udp4: inuse(&v4, "UDP:")?,
        tcp6: inuse(&v6, "TCP6:")?,
        udp6: inuse(&v6, "UDP6:")?,
    })
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
pub fn tcp_mark(net_dir: &Path, inuse: &InUse) -> Option<TcpMark> {
    let snmp = std::fs::read_to_string(net_dir.join("snmp")).ok()?;
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
    fn a_new_namespace_has_no_socket_and_a_listener_shows_in_this_one() {
        let own = read(Path::new("/proc/self/net")).expect("sockstat of this namespace");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let with = read(Path::new("/proc/self/net")).unwrap();
        assert!(with.tcp4 > 0 && with.tcp4 >= own.tcp4, "{own:?} {with:?}");
        drop(l);
    }
}
