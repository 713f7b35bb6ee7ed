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

use std::time::{Duration, Instant};

/// How long owner glances go on in a namespace after a TCP connection closed unseen there.
pub const GLANCE_FOR: Duration = Duration::from_secs(120);
/// CPU time the glances' dumps may take, all namespaces together, per second of wall time:
/// 1 % of one CPU (about eight dumps a second here). Beyond it a due glance is skipped and
/// counted (`owner_glance_budget` in `/metrics`): a node of many namespaces that all see short
/// connections would otherwise pay a walk of the hash table per namespace four times a second.
pub const GLANCE_CPU_PER_SEC: Duration = Duration::from_millis(10);
/// The most CPU time the glance budget saves up while glances cost less (a burst).
pub const GLANCE_CPU_BURST: Duration = Duration::from_millis(20);

/// One namespace's glance schedule.
#[derive(Debug, Default)]
pub struct Pace {
    /// Glances run until then.
    until: Option<Instant>,
    /// The namespace's TCP opens (`ActiveOpens + PassiveOpens`) before its latest dump, when
    /// they could be read.
    opens: Option<u64>,
    /// Connections closed unseen since then (their destroy events): each counted one open.
    unseen: u64,
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

    /// Before a sample's dump of the namespace: note its opens (`opens`: read now), so that the
    /// next glance dumps only for connections opened after this dump. Reads nothing while
    /// glances are off.
    pub fn before_sample(&mut self, opens: impl FnOnce() -> Option<u64>, now: Instant) {
        if self.active(now) {
            self.opens = opens();
        } else {
            self.opens = None;
        }
        self.unseen = 0;
    }

    /// `n` connections of the namespace closed before any sample saw them (their destroy
    /// events, folded in after its latest dump): their opens need no glance.
    pub fn closed_unseen(&mut self, n: u64) {
        self.unseen = self.unseen.saturating_add(n);
    }

    /// Before a glance, given the namespace's opens read now ([`tcp_opens`]): whether it
    /// should dump the namespace (glances on, and a connection opened since its previous dump
    /// that has not closed since — the opens moved by more than the connections closed unseen
    /// meanwhile —, or the counters unreadable). A connection that opened and closed between
    /// two glances cannot be caught by a dump: it is no longer in any table.
    pub fn due(&self, opens: Option<u64>, now: Instant) -> bool {
        self.active(now)
            && match (opens, self.opens) {
                (Some(o), Some(then)) => o.checked_sub(then) != Some(self.unseen),
                _ => true,
            }
    }

    /// The glance dumps the namespace: `opens` (read before the dump) are its counters now.
    pub fn dumped(&mut self, opens: Option<u64>) {
        self.opens = opens;
        self.unseen = 0;
    }
}

/// The glances' CPU allowance: a token bucket filled at [`GLANCE_CPU_PER_SEC`] up to
/// [`GLANCE_CPU_BURST`], spent by each dump's CPU time (this thread's, so a loaded machine's
/// waits do not count).
#[derive(Debug)]
pub struct Budget {
    /// Nanoseconds of CPU the next dumps may take (negative: overspent).
    allowance_ns: i64,
    last: Option<Instant>,
    /// CPU time earned per second of wall time, and the most saved up.
    per_sec: Duration,
    burst: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Self::new(GLANCE_CPU_PER_SEC, GLANCE_CPU_BURST)
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl Budget {
    /// A budget earning `per_sec` of CPU per second of wall time, saving up at most `burst`
    /// (full at first).
    pub fn new(per_sec: Duration, burst: Duration) -> Self {
        Self {
            allowance_ns: nanos(burst),
            last: None,
            per_sec,
            burst,
        }
    }

    /// Whether a dump may be made now.
    pub fn allows(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let earned = now.saturating_duration_since(last).as_secs_f64()
                * self.per_sec.as_secs_f64()
                * 1e9;
            self.allowance_ns =
                (self.allowance_ns.saturating_add(earned as i64)).min(nanos(self.burst));
        }
        self.last = Some(now);
        self.allowance_ns > 0
    }

    /// A dump took `cpu`.
    pub fn spend(&mut self, cpu: Duration) {
        self.allowance_ns = self.allowance_ns.saturating_sub(nanos(cpu));
    }
}

/// This thread's CPU time so far.
pub fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// `ActiveOpens + PassiveOpens` of the namespace whose `net` directory is `net_dir`
/// (`/proc/<pid>/net`); `None` when the file or a counter is missing.
#[cfg(test)] // the sampler reads held files (sockstat::NetFiles)
pub fn tcp_opens(net_dir: &std::path::Path) -> Option<u64> {
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
        // A glance as NetCollector::glance makes it: read, ask, dump.
        let glance = |p: &mut Pace, at: Instant| {
            let opens = tcp_opens(dir.path());
            let due = p.due(opens, at);
            if due {
                p.dumped(opens);
            }
            due
        };
        assert!(!glance(&mut p, t), "off until started");
        p.start(t);
        assert!(glance(&mut p, t), "first glance: nothing known");
        assert!(!glance(&mut p, t), "no connection opened since");
        write(11);
        assert!(glance(&mut p, t), "one opened");
        write(12);
        p.before_sample(|| tcp_opens(dir.path()), t);
        assert!(
            !glance(&mut p, t),
            "the sample's dump saw the connection opened before it"
        );
        write(13);
        assert!(
            p.due(tcp_opens(dir.path()), t),
            "one opened since the sample"
        );
        assert!(
            p.due(tcp_opens(dir.path()), t),
            "still due while no dump was made (skipped for the budget)"
        );
        assert!(p.due(None, t), "unreadable counters: dump");
        assert!(!glance(&mut p, t + GLANCE_FOR), "over");
    }

    #[test]
    fn a_glance_does_not_dump_for_connections_that_already_closed_unseen() {
        let dir = tempfile::tempdir().unwrap();
        let write = |opens: u64| {
            std::fs::write(
                dir.path().join("snmp"),
                format!("Tcp: ActiveOpens PassiveOpens\nTcp: {opens} 0\n"),
            )
            .unwrap();
        };
        let t = Instant::now();
        let mut p = Pace::default();
        p.start(t);
        write(100);
        p.dumped(tcp_opens(dir.path()));
        // Two short connections opened and closed (their events folded in): nothing to catch.
        write(102);
        p.closed_unseen(2);
        assert!(!p.due(tcp_opens(dir.path()), t), "both already closed");
        // A third one opened and is still open: dump.
        write(103);
        assert!(p.due(tcp_opens(dir.path()), t), "one still open");
        // More closes counted than opens (an event of a connection opened before the dump):
        // not exact, so dump.
        p.closed_unseen(2);
        assert!(
            p.due(tcp_opens(dir.path()), t),
            "closes beyond the opens: dump"
        );
        p.dumped(tcp_opens(dir.path()));
        assert!(!p.due(tcp_opens(dir.path()), t), "nothing since the dump");
    }

    #[test]
    fn the_budget_allows_dumps_up_to_its_share_of_cpu_and_refills_with_time() {
        let mut b = Budget::default();
        let t = Instant::now();
        let dump = Duration::from_millis(6);
        let mut made = 0;
        while b.allows(t) {
            b.spend(dump);
            made += 1;
        }
        assert_eq!(
            made, 4,
            "20 ms of burst: four dumps of 6 ms (the last overspends)"
        );
        assert!(
            !b.allows(t + Duration::from_millis(100)),
            "1 ms earned, 4 owed"
        );
        assert!(b.allows(t + Duration::from_millis(500)), "5 ms earned");
        // Never more than the burst saved up.
        let mut b = Budget::default();
        assert!(b.allows(t));
        let later = t + Duration::from_secs(3600);
        let mut made = 0;
        while b.allows(later) {
            b.spend(dump);
            made += 1;
        }
        assert_eq!(made, 4);
    }

    #[test]
    fn this_thread_s_cpu_time_grows_with_work() {
        let before = thread_cpu();
        let mut x = 0u64;
        while thread_cpu() == before {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert!(thread_cpu() > before, "{x}");
    }

    #[test]
    fn a_connection_of_this_process_moves_its_namespace_counters() {
        let net = std::path::Path::new("/proc/self/net");
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
