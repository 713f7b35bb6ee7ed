//! When an owner glance is worth its dump ([`super::NetCollector::glance`]).
//!
//! A glance exists to see, while it is open, a TCP connection that no sample has seen yet, so
//! that its owner is known when it closes before the next sample. It costs one sock_diag dump of
//! the namespace's TCP sockets, and every such dump walks the kernel's whole TCP established
//! hash table whichever namespace asks (2^18 buckets on the 24 GB development VM: **1.2 ms of
//! CPU per dump with 20 sockets in it**, measured with a C loop of 500 `TCPDIAG_GETSOCK` dumps;
//! asking without `tcp_info` or without listeners changes nothing: the walk is the cost).
//!
//! A new connection moves the namespace's TCP open counters: `ActiveOpens` (a `connect`, counted
//! when the SYN is sent) or `PassiveOpens` (an accepted connection, counted when the child
//! socket is made), both in the namespace's own `/proc/<pid>/net/snmp` (the TCP MIB covers IPv4
//! and IPv6 alike). Reading that file costs about 9 µs (same machine, 2 CPUs; its per-CPU sums
//! grow with the CPU count). So [`Pace`] reads the two counters before each glance's dump and
//! dumps only when they moved since the namespace's previous dump (a glance's or a sample's): a
//! namespace where no connection opened since has nothing new to glance at. The check is exact
//! in that direction (no open, no new connection); when the counters cannot be read the glance
//! dumps as before.
//!
//! Glances run in a namespace only for [`GLANCE_FOR`] after a TCP connection to a remote
//! (neither loopback nor unconnected) closed there before any sample saw it
//! ([`super::flows::Tracker::take_glance_trigger`]).

use std::path::Path;
use std::time::{Duration, Instant};

/// How long owner glances go on in a namespace after a TCP connection closed unseen there.
pub const GLANCE_FOR: Duration = Duration::from_secs(120);

/// One namespace's glance schedule.
#[derive(Debug, Default)]
pub struct Pace {
    /// Glances run until then.
    until: Option<Instant>,
    /// The namespace's TCP opens (`ActiveOpens + PassiveOpens`) before its latest dump, when
    /// they could be read.
    opens: Option<u64>,
}

impl Pace {
    /// A TCP connection closed unseen: glance for [`GLANCE_FOR`] from `now`.
    pub fn start(&mut self, now: Instant) {
        self.until = Some(now + GLANCE_FOR);
    }

    /// Whether glances run now.
    pub fn active(&self, now: Instant) -> bool {
        self.until.is_some_and(|t| now < t)
    }

    /// Before a sample's dump of the namespace (whose `net` directory is `net_dir`): note its
    /// opens, so that the next glance dumps only for connections opened after this dump. Reads
    /// nothing while glances are off.
    pub fn before_sample(&mut self, net_dir: Option<&Path>, now: Instant) {
        if self.active(now) {
            self.opens = net_dir.and_then(tcp_opens);
        } else {
            self.opens = None;
        }
    }

    /// Before a glance: whether it should dump the namespace (glances on, and a connection
    /// opened since its previous dump, or the counters unreadable). When it says yes the
    /// counters read are kept as those of the dump about to be made.
    pub fn glance_due(&mut self, net_dir: Option<&Path>, now: Instant) -> bool {
        if !self.active(now) {
            return false;
        }
        let opens = net_dir.and_then(tcp_opens);
        if opens.is_some() && opens == self.opens {
            return false;
        }
        self.opens = opens;
        true
    }
}

/// `ActiveOpens + PassiveOpens` of the namespace whose `net` directory is `net_dir`
/// (`/proc/<pid>/net`); `None` when the file or a counter is missing.
pub fn tcp_opens(net_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(net_dir.join("snmp")).ok()?;
    parse_opens(&text)
}

/// `ActiveOpens + PassiveOpens` from the text of a `snmp` file: the first `Tcp:` line names the
/// fields, the second holds their values.
pub fn parse_opens(text: &str) -> Option<u64> {
    let mut tcp = text.lines().filter_map(|l| l.strip_prefix("Tcp:"));
    let names = tcp.next()?;
    let values = tcp.next()?;
    let mut active = None;
    let mut passive = None;
    for (name, value) in names
        .split_ascii_whitespace()
        .zip(values.split_ascii_whitespace())
    {
        match name {
            "ActiveOpens" => active = value.parse::<u64>().ok(),
            "PassiveOpens" => passive = value.parse::<u64>().ok(),
            _ => {}
        }
    }
    active?.checked_add(passive?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
        Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails\n\
        Tcp: 1 200 120000 -1 80 42 11\n\
        Udp: InDatagrams NoPorts\nUdp: 5 6\n";

    #[test]
    fn opens_are_the_sum_of_active_and_passive_and_a_missing_one_is_unknown() {
        assert_eq!(parse_opens(SNMP), Some(122));
        assert_eq!(parse_opens("Tcp: ActiveOpens\nTcp: 3\n"), None);
        assert_eq!(parse_opens("Tcp: ActiveOpens PassiveOpens\n"), None);
        assert_eq!(parse_opens(""), None);
    }

    #[test]
    fn a_glance_dumps_only_while_on_and_after_a_connection_opened_since_the_last_dump() {
        let dir = tempfile::tempdir().unwrap();
        let write = |active: u64| {
            std::fs::write(
                dir.path().join("snmp"),
                format!("Tcp: ActiveOpens PassiveOpens\nTcp: {active} 7\n"),
            )
            .unwrap();
        };
        write(10);
        let t = Instant::now();
        let mut p = Pace::default();
        assert!(!p.glance_due(Some(dir.path()), t), "off until started");
        p.start(t);
        assert!(
            p.glance_due(Some(dir.path()), t),
            "first glance: nothing known"
        );
        assert!(
            !p.glance_due(Some(dir.path()), t),
            "no connection opened since"
        );
        write(11);
        assert!(p.glance_due(Some(dir.path()), t), "one opened");
        write(12);
        p.before_sample(Some(dir.path()), t);
        assert!(
            !p.glance_due(Some(dir.path()), t),
            "the sample's dump saw the connection opened before it"
        );
        assert!(p.glance_due(None, t), "unreadable counters: dump");
        assert!(!p.glance_due(Some(dir.path()), t + GLANCE_FOR), "over");
    }

    #[test]
    fn a_connection_of_this_process_moves_its_namespace_counters() {
        let net = Path::new("/proc/self/net");
        let Some(before) = tcp_opens(net) else {
            panic!("/proc/self/net/snmp has the TCP open counters");
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let after = tcp_opens(net).unwrap();
        // Other tests of this binary open connections too: at least ours (one each way).
        assert!(after >= before + 2, "{before} then {after}");
        drop((c, a));
    }
}
