//! From socket samples to flows: per-socket deltas between two samples ([`Tracker`]) and their
//! aggregation per interval ([`FlowTable`]).
//!
//! # Deltas
//!
//! Sockets are followed by their sock_diag cookie (unique per socket for the boot), or by their
//! inode with the `/proc/net` fallback. Between two samples a TCP socket contributes
//! `tcp_info` counters now − counters at the previous sample:
//! - the **first sample** after start (or after a switch between netlink and the fallback) is a
//!   baseline: it contributes nothing, whatever the sockets carried before;
//! - afterwards a socket **not in the previous sample** contributes its full counters (it was
//!   created in the interval, or its connection completed in it);
//! - a socket **closed** in the interval contributes final counters (from its destroy event)
//!   − counters at the last sample that saw it; a socket created and closed between two samples
//!   contributes its full final counters, with an unknown owner (the destroy event has no inode);
//! - a socket that left the dump without a destroy event (yet) is kept for [`VANISHED_KEEP_MS`]
//!   (a socket reset while its descriptor stays open is freed, and announced, only when the
//!   process closes it); when it expires unannounced, or at once without a destroy
//!   subscription, its bytes since the last sample are lost and it is counted as *missed*.
//!
//! Counters are the kernel's: `bytes_acked` (sent) counts the SYN and the FIN as one byte each,
//! `bytes_received` the peer's FIN. UDP has no counters in sock_diag (no `tcp_info`, and
//! `INET_DIAG_SKMEMINFO` gives queue occupancy, not totals): a connected UDP socket contributes
//! its presence (`bytes_known = false`) to every interval it is seen in. A TCP socket contributes
//! to an interval in which it moved bytes, opened or closed; an idle connection does not.
//!
//! # Aggregation
//!
//! Contributions are summed per (pid, protocol, remote address, port, direction):
//! - **outbound** (the local port is not a listening port of this host): the port is the remote
//!   port, `local_port` is 0 (aggregated over local ports) and `local_address` the first socket's;
//! - **inbound** (the local port is a TCP listening port, or for UDP the port of a bound,
//!   unconnected UDP socket): the port is the *local* service port, reported in `local_port`,
//!   and `remote_port` is 0 (the clients' ephemeral ports are aggregated).
//!
//! Remote addresses are normalised (IPv4-mapped IPv6 → IPv4 text). Unspecified remotes are never
//! flows; loopback and link-local remotes are left out unless configured.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use netlink_packet_sock_diag::constants::TCP_LISTEN;
use sov_proto::pb;

use super::ObservedSocket;

/// How long a socket that left the dump waits for its destroy event before its last bytes are
/// counted as missed.
pub const VANISHED_KEEP_MS: i64 = 10 * 60 * 1000;
/// Most sockets waiting for a destroy event; beyond it the oldest are counted as missed.
pub const MAX_VANISHED: usize = 131_072;
/// Remote address text of the flow that sums what did not fit in `max_flows_per_report`.
pub const OTHER_REMOTE: &str = "other";
/// Distinct sockets remembered per flow (to count `connections`); beyond it each further
/// contribution counts as one more connection (a socket contributing again is then counted
/// again).
pub const MAX_SOCKETS_PER_FLOW: usize = 65_536;
/// Keys of `/proc/net` sockets (no cookie): this bit | inode.
const FALLBACK_KEY: u64 = 1 << 63;

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) → IPv4; anything else unchanged.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// 169.254.0.0/16 and fe80::/10.
pub fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Which remote addresses are flows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filter {
    /// Count 127.0.0.0/8 and ::1.
    pub include_loopback: bool,
    /// Count 169.254.0.0/16 and fe80::/10.
    pub include_link_local: bool,
}

impl Filter {
    /// True when traffic to `remote` (already normalised) is left out.
    pub fn excludes(&self, remote: &IpAddr) -> bool {
        remote.is_unspecified()
            || (!self.include_loopback && remote.is_loopback())
            || (!self.include_link_local && is_link_local(remote))
    }
}

/// What one socket adds to one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub protocol: pb::Protocol,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Owning process; `None` when it could not be seen.
    pub pid: Option<u32>,
    pub direction: pb::Direction,
    /// (sent, received) in the interval; `None` when unknown.
    pub bytes: Option<(u64, u64)>,
    /// Microseconds; 0 when unknown.
    pub min_rtt_us: u32,
    pub srtt_us: u32,
    /// Identity of the socket (cookie, or fallback key), for counting distinct connections.
    pub socket: u64,
    pub start_ms: i64,
    pub end_ms: i64,
    /// The network namespace key of the socket (0: the agent's own).
    pub netns: u64,
}

/// A socket as remembered from the sample that last saw it, in 64 bytes: one per followed
/// socket of every namespace (20,400 with 100 pods of 200 sockets). It was 112 bytes (two
/// 32-byte `SocketAddr`s, `Option`s, 4-byte enums), so 120 a map entry instead of 72.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    /// `tcp_info`'s (`bytes_acked`, `bytes_received`), when `HAS_COUNTERS`.
    counters: (u64, u64),
    /// The local then the remote address, 16 bytes each (an IPv4 one in its first 4).
    addrs: [u8; 32],
    /// The local then the remote port.
    ports: [u16; 2],
    inode: u32,
    /// The owner; 0 when unknown (pid 0 owns no socket).
    pid: u32,
    /// `pb::Protocol` and `pb::Direction` values.
    protocol: u8,
    direction: u8,
    /// `LOCAL_V6`, `REMOTE_V6`, `HAS_COUNTERS`.
    flags: u8,
}

const LOCAL_V6: u8 = 1;
const REMOTE_V6: u8 = 2;
const HAS_COUNTERS: u8 = 4;

/// An address as 16 bytes and whether it is IPv6.
fn ip_bytes(ip: IpAddr) -> ([u8; 16], bool) {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, false)
        }
        IpAddr::V6(a) => (a.octets(), true),
    }
}

/// The address of [`ip_bytes`].
fn ip_of(b: &[u8], v6: bool) -> IpAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    if v6 {
        IpAddr::from(a)
    } else {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    }
}

impl Seen {
    fn new(
        protocol: pb::Protocol,
        inode: u32,
        local: SocketAddr,
        remote: SocketAddr,
        counters: Option<(u64, u64)>,
        pid: Option<u32>,
        direction: pb::Direction,
    ) -> Self {
        let (l, l6) = ip_bytes(local.ip());
        let (r, r6) = ip_bytes(remote.ip());
        let mut addrs = [0u8; 32];
        addrs[..16].copy_from_slice(&l);
        addrs[16..].copy_from_slice(&r);
        let flags = if l6 { LOCAL_V6 } else { 0 }
            | if r6 { REMOTE_V6 } else { 0 }
            | if counters.is_some() { HAS_COUNTERS } else { 0 };
        Self {
            counters: counters.unwrap_or((0, 0)),
            addrs,
            ports: [local.port(), remote.port()],
            inode,
            pid: pid.unwrap_or(0),
            protocol: u8::try_from(protocol as i32).unwrap_or(0),
            direction: u8::try_from(direction as i32).unwrap_or(0),
            flags,
        }
    }

    fn local(&self) -> SocketAddr {
        SocketAddr::new(
            ip_of(&self.addrs[..16], self.flags & LOCAL_V6 != 0),
            self.ports[0],
        )
    }

    fn remote(&self) -> SocketAddr {
        SocketAddr::new(
            ip_of(&self.addrs[16..], self.flags & REMOTE_V6 != 0),
            self.ports[1],
        )
    }

    fn counters(&self) -> Option<(u64, u64)> {
        (self.flags & HAS_COUNTERS != 0).then_some(self.counters)
    }

    fn pid(&self) -> Option<u32> {
        (self.pid != 0).then_some(self.pid)
    }

    fn protocol(&self) -> pb::Protocol {
        pb::Protocol::try_from(i32::from(self.protocol)).unwrap_or(pb::Protocol::Unspecified)
    }

    fn direction(&self) -> pb::Direction {
        pb::Direction::try_from(i32::from(self.direction)).unwrap_or(pb::Direction::Unspecified)
    }
}

/// What a batch of destroy events says about a namespace's TCP hash table (see
/// [`super::sockstat::TcpMark::accounts_for`]): how many of its TCP sockets left it, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCloses {
    /// Sockets a sample had seen (followed, or waiting for their event): each was counted in
    /// `inuse` when it was last dumped, and left the table since.
    pub known: u64,
    /// Connections no sample saw (a remote, not followed): each counted one open
    /// (`ActiveOpens` or `PassiveOpens`) and left the table again.
    pub unseen: u64,
    /// Sockets without a remote (a listener, or one closed before `connect`): what they did to
    /// `inuse` is not known, so the namespace is dumped again.
    pub other: u64,
}

impl TcpCloses {
    /// Add `o` to these counts.
    pub fn add(&mut self, o: TcpCloses) {
        self.known = self.known.saturating_add(o.known);
        self.unseen = self.unseen.saturating_add(o.unseen);
        self.other = self.other.saturating_add(o.other);
    }
}

/// Per-socket state between samples, for the sockets of one network namespace.
#[derive(Debug, Default)]
pub struct Tracker {
    /// The namespace key its contributions carry (0: the agent's own).
    netns: u64,
    live: HashMap<u64, Seen>,
    /// Owners of sockets not yet in a sample, seen by an owner glance ([`Tracker::glance`]):
    /// socket key → (pid, when). A connection that opens and closes between two samples keeps
    /// its owner through its destroy event.
    glimpsed: HashMap<u64, (u32, i64)>,
    /// Since the last [`Tracker::take_unseen`]: sockets closed before any sample saw them, and
    /// of those the ones whose owner no glance saw either.
    unseen_closed: u64,
    unseen_unknown: u64,
    /// Since the last [`Tracker::take_glance_trigger`]: a TCP connection closed unseen (what
    /// an owner glance, which dumps TCP only, could have caught).
    unseen_tcp: bool,
    vanished: HashMap<u64, (Seen, i64)>,
    tcp_listen: HashSet<u16>,
    udp_bound: HashSet<u16>,
    /// Inodes of the listeners (TCP, and bound UDP) of the latest sample that held them: their
    /// owners stay known while the namespace is not dumped.
    listeners: Vec<(pb::Protocol, u32)>,
    last_ms: Option<i64>,
}

/// Which of a namespace's sockets a sample holds, per protocol: every one (a dump), or only
/// some (exact lookups of known sockets, or none at all: the others are unchanged and stay
/// as they were).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    pub all_tcp: bool,
    pub all_udp: bool,
}

impl Scope {
    /// A dump of every protocol.
    pub const FULL: Scope = Scope {
        all_tcp: true,
        all_udp: true,
    };

    fn covers(&self, protocol: pb::Protocol) -> bool {
        match protocol {
            pb::Protocol::Tcp => self.all_tcp,
            _ => self.all_udp,
        }
    }
}

/// What one dump told beyond the contributions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpSummary {
    /// Sockets whose owner is unknown (listeners included).
    pub unknown_owners: usize,
}

fn key(s: &ObservedSocket) -> u64 {
    if s.cookie != 0 {
        s.cookie
    } else {
        FALLBACK_KEY | u64::from(s.inode)
    }
}

/// A listening TCP socket, or a bound but unconnected UDP socket.
pub fn is_listener(s: &ObservedSocket) -> bool {
    match s.protocol {
        pb::Protocol::Tcp => s.state == TCP_LISTEN,
        _ => s.remote.ip().is_unspecified() || s.remote.port() == 0,
    }
}

impl Tracker {
    /// A tracker for the sockets of network namespace `netns` (0: the agent's own).
    pub fn for_netns(netns: u64) -> Self {
        Self {
            netns,
            ..Self::default()
        }
    }

    /// True once a baseline sample was taken.
    pub fn has_baseline(&self) -> bool {
        self.last_ms.is_some()
    }

    /// Sockets waiting for their destroy event.
    pub fn vanished(&self) -> usize {
        self.vanished.len()
    }

    fn direction(&self, s: &ObservedSocket) -> pb::Direction {
        let ports = match s.protocol {
            pb::Protocol::Tcp => &self.tcp_listen,
            _ => &self.udp_bound,
        };
        if ports.contains(&s.local.port()) {
            pb::Direction::Inbound
        } else {
            pb::Direction::Outbound
        }
    }

    /// Sockets followed now (listeners not included).
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// True when no socket is followed.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The inodes of the sockets followed now and of the latest listeners (0 for those
    /// without one).
    pub fn inodes(&self) -> impl Iterator<Item = u32> + '_ {
        self.live
            .values()
            .map(|s| s.inode)
            .chain(self.listeners.iter().map(|l| l.1))
    }

    /// The inodes of the followed sockets whose owner is wanted: listeners, and connections
    /// whose remote `filter` keeps (the owners of the others are never searched for).
    pub fn wanted_inodes<'a>(&'a self, filter: &'a Filter) -> impl Iterator<Item = u32> + 'a {
        self.live
            .values()
            .filter(|s| !filter.excludes(&normalize(s.remote().ip())))
            .map(|s| s.inode)
            .chain(self.listeners.iter().map(|l| l.1))
    }

    /// The followed TCP sockets whose traffic `filter` keeps, as exact lookups can ask for them
    /// (addresses, ports and cookie; no counters). Sockets from `/proc/net` (no cookie) are
    /// left out.
    pub fn lookup_keys(&self, filter: &Filter) -> Vec<ObservedSocket> {
        self.live
            .iter()
            .filter(|(k, s)| {
                s.protocol() == pb::Protocol::Tcp
                    && *k & FALLBACK_KEY == 0
                    && !filter.excludes(&normalize(s.remote().ip()))
            })
            .map(|(k, s)| ObservedSocket {
                protocol: s.protocol(),
                state: 0,
                local: s.local(),
                remote: s.remote(),
                inode: s.inode,
                cookie: *k,
                tcp: None,
            })
            .collect()
    }

    /// Fold a new dump in: contributions since the previous sample go to `out`; sockets that
    /// left the dump start waiting for their destroy event.
    pub fn observe_dump(
        &mut self,
        socks: &[ObservedSocket],
        now_ms: i64,
        owner: &dyn Fn(u32) -> Option<u32>,
        out: &mut Vec<Contribution>,
    ) -> DumpSummary {
        self.observe(socks, Scope::FULL, now_ms, owner, out)
    }

    /// [`Tracker::observe_dump`] of a sample that holds every socket of the protocols `scope`
    /// covers and only some of the others: a followed socket of an uncovered protocol that is
    /// not in `socks` stays as it was (it moved no byte the sample could see), and the
    /// listening ports of an uncovered protocol are kept.
    pub fn observe(
        &mut self,
        socks: &[ObservedSocket],
        scope: Scope,
        now_ms: i64,
        owner: &dyn Fn(u32) -> Option<u32>,
        out: &mut Vec<Contribution>,
    ) -> DumpSummary {
        if scope.all_tcp {
            self.tcp_listen.clear();
        }
        if scope.all_udp {
            self.udp_bound.clear();
        }
        self.listeners.retain(|(p, _)| !scope.covers(*p));
        self.listeners.extend(
            socks
                .iter()
                .filter(|s| is_listener(s) && scope.covers(s.protocol) && s.inode != 0)
                .map(|s| (s.protocol, s.inode)),
        );
        for s in socks
            .iter()
            .filter(|s| is_listener(s) && scope.covers(s.protocol))
        {
            match s.protocol {
                pb::Protocol::Tcp => self.tcp_listen.insert(s.local.port()),
                _ => self.udp_bound.insert(s.local.port()),
            };
        }
        let baseline = self.last_ms.is_none();
        let start_ms = self.last_ms.unwrap_or(now_ms);
        let mut summary = DumpSummary::default();
        let mut live = HashMap::with_capacity(socks.len());
        for s in socks {
            let known = (s.inode != 0).then(|| owner(s.inode)).flatten();
            if is_listener(s) {
                summary.unknown_owners += usize::from(known.is_none());
                continue;
            }
            if s.cookie == 0 && s.inode == 0 {
                // A /proc/net socket without identity (orphaned): nothing to follow.
                continue;
            }
            let k = key(s);
            let prev = self
                .live
                .remove(&k)
                .or_else(|| self.vanished.remove(&k).map(|(p, _)| p));
            let glimpsed = self.glimpsed.remove(&k).map(|(pid, _)| pid);
            let pid = known
                .or_else(|| prev.as_ref().and_then(Seen::pid))
                .or(glimpsed);
            summary.unknown_owners += usize::from(pid.is_none());
            let direction = prev
                .as_ref()
                .map_or_else(|| self.direction(s), Seen::direction);
            let counters = s.tcp.map(|c| (c.bytes_acked, c.bytes_received));
            if !baseline {
                let bytes = match (counters, prev.as_ref()) {
                    (Some((a, r)), Some(p)) => {
                        let (pa, pr) = p.counters().unwrap_or((a, r));
                        Some((a.saturating_sub(pa), r.saturating_sub(pr)))
                    }
                    (Some(c), None) => Some(c),
                    (None, _) => None,
                };
                let touched = match bytes {
                    Some((ds, dr)) => prev.is_none() || ds > 0 || dr > 0,
                    // Without counters a socket's presence is all there is to report.
                    None => true,
                };
                if touched {
                    out.push(Contribution {
                        protocol: s.protocol,
                        local: s.local,
                        remote: s.remote,
                        pid,
                        direction,
                        bytes,
                        min_rtt_us: s.tcp.map_or(0, |c| c.min_rtt_us),
                        srtt_us: s.tcp.map_or(0, |c| c.srtt_us),
                        socket: k,
                        start_ms,
                        end_ms: now_ms,
                        netns: self.netns,
                    });
                }
            }
            live.insert(
                k,
                Seen::new(
                    s.protocol, s.inode, s.local, s.remote, counters, pid, direction,
                ),
            );
        }
        if scope == Scope::FULL {
            for (k, seen) in std::mem::replace(&mut self.live, live) {
                self.vanished.insert(k, (seen, now_ms));
            }
        } else {
            // In place: most followed sockets stay as they are.
            let vanished = &mut self.vanished;
            self.live.retain(|k, seen| {
                if !scope.covers(seen.protocol()) {
                    return true;
                }
                vanished.insert(*k, (seen.clone(), now_ms));
                false
            });
            self.live.extend(live);
        }
        summary
    }

    /// How the TCP sockets of `events` (destroy events of this namespace, not folded in yet)
    /// left the hash table ([`TcpCloses`]); UDP events count nowhere.
    pub fn tcp_closes(&self, events: &[ObservedSocket]) -> TcpCloses {
        let mut c = TcpCloses::default();
        for e in events.iter().filter(|e| e.protocol == pb::Protocol::Tcp) {
            let k = key(e);
            if self.live.contains_key(&k) || self.vanished.contains_key(&k) {
                c.known += 1;
            } else if !e.remote.ip().is_unspecified() && e.remote.port() != 0 {
                c.unseen += 1;
            } else {
                c.other += 1;
            }
        }
        c
    }

    /// Fold destroy events in (their final counters) for the interval since the last finished
    /// sample; before the baseline is finished they only end the sockets' tracking (their
    /// traffic predates observation). Returns how many were folded.
    pub fn absorb_destroyed(
        &mut self,
        events: &[ObservedSocket],
        now_ms: i64,
        out: &mut Vec<Contribution>,
    ) -> usize {
        for e in events {
            let k = key(e);
            let prev = self
                .live
                .remove(&k)
                .or_else(|| self.vanished.remove(&k).map(|(p, _)| p));
            let glimpsed = self.glimpsed.remove(&k).map(|(pid, _)| pid);
            let Some(start_ms) = self.last_ms else {
                continue;
            };
            // A connection on loopback never leaves the node: its owner does not decide any
            // egress, and local clients (a Prometheus scrape every second) would otherwise keep
            // the owner glances on for good.
            // Nor is a socket that never connected (no remote: closed before `connect`, or an
            // unconnected UDP socket): no connection, no owner to catch.
            let remote = normalize(e.remote.ip());
            let connected = !remote.is_unspecified() && e.remote.port() != 0;
            if prev.is_none() && connected && !remote.is_loopback() {
                self.unseen_closed += 1;
                self.unseen_unknown += u64::from(glimpsed.is_none());
                self.unseen_tcp |= e.protocol == pb::Protocol::Tcp;
            }
            let fin = e.tcp.map(|c| (c.bytes_acked, c.bytes_received));
            let (bytes, pid, direction) = match prev {
                Some(p) => {
                    let bytes = match (fin, p.counters()) {
                        (Some((a, r)), Some((pa, pr))) => {
                            Some((a.saturating_sub(pa), r.saturating_sub(pr)))
                        }
                        (f, _) => f,
                    };
                    (bytes, p.pid(), p.direction())
                }
                None => (fin, glimpsed, self.direction(e)),
            };
            out.push(Contribution {
                protocol: e.protocol,
                local: e.local,
                remote: e.remote,
                pid,
                direction,
                bytes,
                min_rtt_us: e.tcp.map_or(0, |c| c.min_rtt_us),
                srtt_us: e.tcp.map_or(0, |c| c.srtt_us),
                socket: k,
                start_ms,
                end_ms: now_ms,
                netns: self.netns,
            });
        }
        events.len()
    }

    /// An owner glance between two samples: remember the owner of every connected socket of
    /// `socks` that no sample has seen yet (`owner` maps an inode to its pid). Returns how many
    /// were remembered.
    pub fn glance(
        &mut self,
        socks: &[ObservedSocket],
        now_ms: i64,
        owner: &dyn Fn(u32) -> Option<u32>,
    ) -> usize {
        let mut n = 0;
        for s in socks {
            if is_listener(s) || s.inode == 0 {
                continue;
            }
            let k = key(s);
            if self.live.contains_key(&k)
                || self.vanished.contains_key(&k)
                || self.glimpsed.contains_key(&k)
            {
                continue;
            }
            if let Some(pid) = owner(s.inode) {
                self.glimpsed.insert(k, (pid, now_ms));
                n += 1;
            }
        }
        if self.glimpsed.len() > MAX_VANISHED {
            // Bounded like the vanished sockets: the oldest go first.
            let mut ages: Vec<(i64, u64)> = self.glimpsed.iter().map(|(k, v)| (v.1, *k)).collect();
            ages.sort_unstable();
            let excess = self.glimpsed.len() - MAX_VANISHED;
            for (_, k) in ages.into_iter().take(excess) {
                self.glimpsed.remove(&k);
            }
        }
        n
    }

    /// Sockets closed before any sample saw them since the previous call, and of those the
    /// ones whose owner stayed unknown.
    pub fn take_unseen(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.unseen_closed),
            std::mem::take(&mut self.unseen_unknown),
        )
    }

    /// Whether a TCP connection closed unseen since the previous call (glances help only
    /// those: they dump TCP).
    pub fn take_glance_trigger(&mut self) -> bool {
        std::mem::take(&mut self.unseen_tcp)
    }

    /// End a sample: it becomes the start of the next interval. Sockets that waited too long
    /// for their destroy event expire (all of them at once when there is no destroy
    /// subscription). Returns how many TCP sockets' last bytes were lost.
    pub fn finish(&mut self, now_ms: i64, subscribed: bool) -> u64 {
        self.last_ms = Some(now_ms);
        // A glimpsed socket whose close never came within the keep time is forgotten.
        self.glimpsed
            .retain(|_, (_, at)| now_ms - *at <= VANISHED_KEEP_MS);
        let mut missed = 0u64;
        self.vanished.retain(|_, (seen, at)| {
            let keep = subscribed && now_ms - *at <= VANISHED_KEEP_MS;
            if !keep && seen.counters().is_some() {
                missed += 1;
            }
            keep
        });
        if self.vanished.len() > MAX_VANISHED {
            let mut ages: Vec<(i64, u64)> = self.vanished.iter().map(|(k, v)| (v.1, *k)).collect();
            ages.sort_unstable();
            let excess = self.vanished.len() - MAX_VANISHED;
            for (_, k) in ages.into_iter().take(excess) {
                if let Some((seen, _)) = self.vanished.remove(&k) {
                    missed += u64::from(seen.counters().is_some());
                }
            }
        }
        missed
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FlowKey {
    /// Network namespace key (0: the agent's own): flows of unknown owners in two pods stay
    /// apart.
    netns: u64,
    pid: Option<u32>,
    protocol: pb::Protocol,
    /// `None`: the "other" flow of this pid, protocol and direction.
    remote: Option<IpAddr>,
    /// Remote port (outbound) or local service port (inbound).
    port: u16,
    direction: pb::Direction,
}

impl FlowKey {
    fn other(&self) -> Self {
        Self {
            remote: None,
            port: 0,
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone)]
struct FlowAcc {
    local: IpAddr,
    bytes_sent: u64,
    bytes_received: u64,
    bytes_known: bool,
    min_rtt_us: u32,
    srtt_sum: u64,
    srtt_n: u64,
    sockets: HashSet<u64>,
    /// Connections beyond [`MAX_SOCKETS_PER_FLOW`].
    more_sockets: u64,
    start_ms: i64,
    end_ms: i64,
}

impl FlowAcc {
    fn new(local: IpAddr, bytes_known: bool, start_ms: i64, end_ms: i64) -> Self {
        Self {
            local,
            bytes_sent: 0,
            bytes_received: 0,
            bytes_known,
            min_rtt_us: 0,
            srtt_sum: 0,
            srtt_n: 0,
            sockets: HashSet::new(),
            more_sockets: 0,
            start_ms,
            end_ms,
        }
    }

    fn add(&mut self, c: &Contribution) {
        let (s, r) = c.bytes.unwrap_or((0, 0));
        self.bytes_sent = self.bytes_sent.saturating_add(s);
        self.bytes_received = self.bytes_received.saturating_add(r);
        self.bytes_known &= c.bytes.is_some();
        if c.min_rtt_us > 0 && (self.min_rtt_us == 0 || c.min_rtt_us < self.min_rtt_us) {
            self.min_rtt_us = c.min_rtt_us;
        }
        if c.srtt_us > 0 {
            self.srtt_sum += u64::from(c.srtt_us);
            self.srtt_n += 1;
        }
        if self.sockets.len() < MAX_SOCKETS_PER_FLOW || self.sockets.contains(&c.socket) {
            self.sockets.insert(c.socket);
        } else {
            self.more_sockets += 1;
        }
        self.start_ms = self.start_ms.min(c.start_ms);
        self.end_ms = self.end_ms.max(c.end_ms);
    }

    fn merge(&mut self, o: FlowAcc) {
        self.bytes_sent = self.bytes_sent.saturating_add(o.bytes_sent);
        self.bytes_received = self.bytes_received.saturating_add(o.bytes_received);
        self.bytes_known &= o.bytes_known;
        if o.min_rtt_us > 0 && (self.min_rtt_us == 0 || o.min_rtt_us < self.min_rtt_us) {
            self.min_rtt_us = o.min_rtt_us;
        }
        self.srtt_sum += o.srtt_sum;
        self.srtt_n += o.srtt_n;
        self.more_sockets += o.more_sockets;
        for id in o.sockets {
            if self.sockets.len() < MAX_SOCKETS_PER_FLOW || self.sockets.contains(&id) {
                self.sockets.insert(id);
            } else {
                self.more_sockets += 1;
            }
        }
        self.start_ms = self.start_ms.min(o.start_ms);
        self.end_ms = self.end_ms.max(o.end_ms);
    }

    fn total(&self) -> u64 {
        self.bytes_sent.saturating_add(self.bytes_received)
    }

    fn connections(&self) -> u64 {
        self.sockets.len() as u64 + self.more_sockets
    }
}

/// The pending flows of the current report interval.
#[derive(Debug)]
pub struct FlowTable {
    entries: HashMap<FlowKey, FlowAcc>,
    filter: Filter,
    max_entries: usize,
    folded: u64,
}

impl FlowTable {
    /// A table holding at most `max_entries` distinct flows; beyond it new flows go straight to
    /// their "other" flow.
    pub fn new(filter: Filter, max_entries: usize) -> Self {
        Self {
            entries: HashMap::new(),
            filter,
            max_entries,
            folded: 0,
        }
    }

    /// Distinct flows pending.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no flow is pending.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Add one contribution; false when its remote is filtered out.
    pub fn add(&mut self, c: &Contribution) -> bool {
        let remote = normalize(c.remote.ip());
        if self.filter.excludes(&remote) {
            return false;
        }
        let port = match c.direction {
            pb::Direction::Inbound => c.local.port(),
            _ => c.remote.port(),
        };
        let mut key = FlowKey {
            netns: c.netns,
            pid: c.pid,
            protocol: c.protocol,
            remote: Some(remote),
            port,
            direction: c.direction,
        };
        if !self.entries.contains_key(&key) && self.entries.len() >= self.max_entries {
            key = key.other();
            self.folded += 1;
        }
        let local = normalize(c.local.ip());
        self.entries
            .entry(key)
            .or_insert_with(|| FlowAcc::new(local, c.bytes.is_some(), c.start_ms, c.end_ms))
            .add(c);
        true
    }

    /// Owners of the pending flows.
    pub fn pids(&self) -> Vec<u32> {
        let set: HashSet<u32> = self.entries.keys().filter_map(|k| k.pid).collect();
        let mut v: Vec<u32> = set.into_iter().collect();
        v.sort_unstable();
        v
    }

    /// Every pending flow, at most `max_flows` of them (the smallest by bytes, then by
    /// connections, are summed into one "other" flow per pid, protocol and direction), largest
    /// first, and the number of flows folded or dropped for the bound since the last take.
    pub fn take(&mut self, max_flows: usize) -> (Vec<pb::Flow>, u64) {
        let mut dropped = std::mem::take(&mut self.folded);
        let mut flows: Vec<(FlowKey, FlowAcc)> = self.entries.drain().collect();
        let order = |a: &(FlowKey, FlowAcc), b: &(FlowKey, FlowAcc)| {
            b.1.total()
                .cmp(&a.1.total())
                .then(b.1.connections().cmp(&a.1.connections()))
                .then(a.0.cmp(&b.0))
        };
        flows.sort_by(order);
        if flows.len() > max_flows {
            // Keep k flows and fold the rest into their "other" flows, with k + others ≤ max.
            let mut groups: HashSet<FlowKey> =
                flows[max_flows..].iter().map(|f| f.0.other()).collect();
            let mut k = max_flows;
            while k > 0 && k + groups.len() > max_flows {
                k -= 1;
                groups.insert(flows[k].0.other());
            }
            let rest = flows.split_off(k);
            dropped += rest.len() as u64;
            let mut others: HashMap<FlowKey, FlowAcc> = HashMap::new();
            for (key, acc) in rest {
                match others.entry(key.other()) {
                    Entry::Occupied(mut e) => e.get_mut().merge(acc),
                    Entry::Vacant(e) => {
                        e.insert(acc);
                    }
                }
            }
            flows.extend(others);
            flows.sort_by(order);
            flows.truncate(max_flows);
        }
        let out = flows
            .into_iter()
            .map(|(key, acc)| to_flow(&key, &acc))
            .collect();
        (out, dropped)
    }
}

fn to_flow(key: &FlowKey, acc: &FlowAcc) -> pb::Flow {
    let inbound = key.direction == pb::Direction::Inbound;
    pb::Flow {
        protocol: key.protocol as i32,
        local_address: acc.local.to_string(),
        local_port: if inbound && key.remote.is_some() {
            u32::from(key.port)
        } else {
            0
        },
        remote_address: key
            .remote
            .map_or_else(|| OTHER_REMOTE.to_owned(), |ip| ip.to_string()),
        remote_port: if inbound { 0 } else { u32::from(key.port) },
        pid: key.pid.unwrap_or(0),
        owner_unknown: key.pid.is_none(),
        bytes_sent: acc.bytes_sent,
        bytes_received: acc.bytes_received,
        bytes_known: acc.bytes_known,
        direction: key.direction as i32,
        min_rtt_us: acc.min_rtt_us,
        smoothed_rtt_us: acc
            .srtt_sum
            .checked_div(acc.srtt_n)
            .map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX)),
        connections: u32::try_from(acc.connections()).unwrap_or(u32::MAX),
        start_unix_ms: acc.start_ms,
        end_unix_ms: acc.end_ms,
        netns_inode: key.netns,
        container: None,
        measurement: measurement(key.protocol, acc.bytes_known) as i32,
    }
}

/// How a flow's bytes were measured: TCP counters come from `tcp_info`; a UDP socket has
/// counters only when connection tracking gave them ([`super::conntrack`]).
fn measurement(protocol: pb::Protocol, bytes_known: bool) -> pb::Measurement {
    match (bytes_known, protocol) {
        (false, _) => pb::Measurement::Unmeasured,
        (true, pb::Protocol::Udp) => pb::Measurement::Conntrack,
        (true, _) => pb::Measurement::Exact,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::net::TcpCounters;

    fn sock(cookie: u64, local: &str, remote: &str, acked: u64, recvd: u64) -> ObservedSocket {
        ObservedSocket {
            protocol: pb::Protocol::Tcp,
            state: 1,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            inode: 0,
            cookie,
            tcp: Some(TcpCounters {
                bytes_acked: acked,
                bytes_received: recvd,
                min_rtt_us: 10,
                srtt_us: 20,
            }),
        }
    }

    fn contribution(pid: u32, remote: &str, sent: u64, socket: u64) -> Contribution {
        Contribution {
            protocol: pb::Protocol::Tcp,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: remote.parse().unwrap(),
            pid: Some(pid),
            direction: pb::Direction::Outbound,
            bytes: Some((sent, 0)),
            min_rtt_us: 0,
            srtt_us: 0,
            socket,
            start_ms: 1,
            end_ms: 2,
            netns: 0,
        }
    }

    const NOBODY: &dyn Fn(u32) -> Option<u32> = &|_| None;

    #[test]
    fn a_followed_socket_takes_64_bytes_and_keeps_its_addresses_ports_and_counters() {
        assert!(
            std::mem::size_of::<Seen>() <= 64,
            "{}",
            std::mem::size_of::<Seen>()
        );
        for (l, r) in [
            ("10.0.0.1:443", "192.0.2.7:55000"),
            ("[2001:db8::1]:8080", "[2001:db8::2]:1"),
            ("[::ffff:10.0.0.1]:80", "127.0.0.1:0"),
        ] {
            let (l, r): (SocketAddr, SocketAddr) = (l.parse().unwrap(), r.parse().unwrap());
            let s = Seen::new(
                pb::Protocol::Udp,
                77,
                l,
                r,
                Some((u64::MAX, 5)),
                Some(4_000_000),
                pb::Direction::Inbound,
            );
            assert_eq!((s.local(), s.remote()), (l, r));
            assert_eq!(s.counters(), Some((u64::MAX, 5)));
            assert_eq!(s.pid(), Some(4_000_000));
            assert_eq!(s.protocol(), pb::Protocol::Udp);
            assert_eq!(s.direction(), pb::Direction::Inbound);
            let s = Seen::new(
                pb::Protocol::Tcp,
                0,
                l,
                r,
                None,
                None,
                pb::Direction::Outbound,
            );
            assert_eq!((s.counters(), s.pid()), (None, None));
            assert_eq!(s.direction(), pb::Direction::Outbound);
        }
    }

    #[test]
    fn ipv4_mapped_addresses_become_ipv4_and_others_are_unchanged() {
        assert_eq!(
            normalize("::ffff:192.0.2.7".parse().unwrap()).to_string(),
            "192.0.2.7"
        );
        assert_eq!(
            normalize("2001:db8::7".parse().unwrap()).to_string(),
            "2001:db8::7"
        );
        assert_eq!(normalize("::1".parse().unwrap()).to_string(), "::1");
        let mut t = FlowTable::new(Filter::default(), 100);
        let mut c = contribution(1, "[::ffff:198.51.100.4]:443", 5, 1);
        c.local = "[::ffff:10.0.0.1]:40000".parse().unwrap();
        t.add(&c);
        let (flows, _) = t.take(10);
        assert_eq!(flows[0].remote_address, "198.51.100.4");
        assert_eq!(flows[0].local_address, "10.0.0.1");
        // A mapped loopback address is loopback.
        assert!(!t.add(&contribution(1, "[::ffff:127.0.0.1]:443", 5, 1)));
    }

    #[test]
    fn loopback_link_local_and_unspecified_remotes_are_filtered_as_configured() {
        let f = Filter::default();
        for ip in [
            "127.0.0.1",
            "::1",
            "169.254.1.1",
            "fe80::1",
            "0.0.0.0",
            "::",
        ] {
            assert!(f.excludes(&ip.parse().unwrap()), "{ip}");
        }
        assert!(!f.excludes(&"192.0.2.1".parse().unwrap()));
        let all = Filter {
            include_loopback: true,
            include_link_local: true,
        };
        assert!(!all.excludes(&"127.0.0.1".parse().unwrap()));
        assert!(!all.excludes(&"fe80::1".parse().unwrap()));
        assert!(all.excludes(&"0.0.0.0".parse().unwrap()));
    }

    #[test]
    fn the_first_sample_is_a_baseline_and_later_samples_give_deltas_and_new_sockets_in_full() {
        let mut t = Tracker::default();
        let mut out = vec![];
        t.observe_dump(
            &[sock(1, "10.0.0.1:40000", "192.0.2.1:443", 100, 50)],
            1000,
            NOBODY,
            &mut out,
        );
        assert_eq!(t.finish(1000, true), 0);
        assert!(out.is_empty(), "baseline");
        t.observe_dump(
            &[
                sock(1, "10.0.0.1:40000", "192.0.2.1:443", 160, 70),
                sock(2, "10.0.0.1:40001", "192.0.2.1:443", 9, 3),
            ],
            2000,
            NOBODY,
            &mut out,
        );
        assert_eq!(t.finish(2000, true), 0);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].bytes, Some((60, 20)));
        assert_eq!(out[1].bytes, Some((9, 3)), "a new socket counts in full");
        assert_eq!((out[0].start_ms, out[0].end_ms), (1000, 2000));
        out.clear();
        // Idle: nothing.
        t.observe_dump(
            &[
                sock(1, "10.0.0.1:40000", "192.0.2.1:443", 160, 70),
                sock(2, "10.0.0.1:40001", "192.0.2.1:443", 9, 3),
            ],
            3000,
            NOBODY,
            &mut out,
        );
        assert_eq!(t.finish(3000, true), 0);
        assert!(out.is_empty(), "an idle connection contributes nothing");
    }

    #[test]
    fn a_closed_socket_contributes_its_final_delta_once_and_an_unseen_one_in_full_without_owner() {
        let mut t = Tracker::default();
        let mut out = vec![];
        let owner: &dyn Fn(u32) -> Option<u32> = &|_| Some(42);
        let mut s1 = sock(1, "10.0.0.1:40000", "192.0.2.1:443", 100, 50);
        s1.inode = 7;
        t.observe_dump(&[s1], 1000, owner, &mut out);
        assert_eq!(t.finish(1000, true), 0);
        // Socket 1 leaves the dump; its event arrives; socket 3 lived only between samples.
        t.observe_dump(&[], 2000, owner, &mut out);
        assert_eq!(t.vanished(), 1);
        let events = [
            sock(1, "10.0.0.1:40000", "192.0.2.1:443", 1100, 60),
            sock(3, "10.0.0.1:40003", "192.0.2.9:443", 500, 5),
        ];
        assert_eq!(t.absorb_destroyed(&events, 2000, &mut out), 2);
        assert_eq!(out[0].bytes, Some((1000, 10)));
        assert_eq!(out[0].pid, Some(42), "the owner remembered from the dump");
        assert_eq!((out[0].start_ms, out[0].end_ms), (1000, 2000));
        assert_eq!(out[1].bytes, Some((500, 5)));
        assert_eq!(out[1].pid, None, "destroy events carry no inode");
        assert_eq!(t.finish(2000, true), 0);
        assert_eq!(t.vanished(), 0);
        // Once its event is folded in, a socket is forgotten.
        assert!(!t.live.contains_key(&1));
    }

    #[test]
    fn a_connection_glimpsed_between_samples_keeps_its_owner_when_it_closes_unseen() {
        let mut t = Tracker::default();
        let mut out = vec![];
        t.observe_dump(&[], 1000, NOBODY, &mut out);
        assert_eq!(t.finish(1000, true), 0);
        // A glance between samples sees socket 5 (inode 9, pid 77) while it is open.
        let mut s5 = sock(5, "10.0.0.1:40005", "192.0.2.1:443", 10, 1);
        s5.inode = 9;
        let owner: &dyn Fn(u32) -> Option<u32> = &|ino| (ino == 9).then_some(77);
        assert_eq!(t.glance(&[s5], 1300, owner), 1);
        // Both close before the next sample: 5 keeps its owner, 6 (never glimpsed) has none.
        let events = [
            sock(5, "10.0.0.1:40005", "192.0.2.1:443", 300_000, 1),
            sock(6, "10.0.0.1:40006", "192.0.2.1:443", 300_000, 1),
        ];
        assert_eq!(t.absorb_destroyed(&events, 1600, &mut out), 2);
        assert_eq!((out[0].pid, out[0].bytes), (Some(77), Some((300_000, 1))));
        assert_eq!(out[1].pid, None);
        assert_eq!(
            t.take_unseen(),
            (2, 1),
            "two closed unseen, one without owner"
        );
        assert_eq!(t.take_unseen(), (0, 0));
        assert!(t.glimpsed.is_empty(), "a glimpsed owner is used once");
        // A short connection on loopback (a local scrape) is not counted: it would keep the
        // glances on while deciding no egress.
        let local = [
            sock(7, "127.0.0.1:40007", "127.0.0.1:9100", 100_000, 1),
            sock(8, "[::1]:40008", "[::1]:9100", 100_000, 1),
        ];
        assert_eq!(t.absorb_destroyed(&local, 1700, &mut out), 2);
        assert_eq!(t.take_unseen(), (0, 0));
        assert!(
            t.take_glance_trigger(),
            "the TCP connection closed unseen above"
        );
        assert!(!t.take_glance_trigger());
        // Neither is a socket that never connected (closed before `connect`: no remote), nor
        // an unconnected UDP socket; a connected UDP socket is counted but starts no glance
        // (glances dump TCP only).
        let mut unconnected_udp = sock(9, "10.0.0.1:5353", "0.0.0.0:0", 0, 0);
        unconnected_udp.protocol = pb::Protocol::Udp;
        let mut dns = sock(10, "10.0.0.1:40010", "192.0.2.53:53", 0, 0);
        dns.protocol = pb::Protocol::Udp;
        let never = sock(11, "0.0.0.0:0", "0.0.0.0:0", 0, 0);
        t.absorb_destroyed(&[unconnected_udp, never], 1700, &mut out);
        assert_eq!(t.take_unseen(), (0, 0));
        t.absorb_destroyed(&[dns], 1700, &mut out);
        assert_eq!(t.take_unseen(), (1, 1));
        assert!(!t.take_glance_trigger(), "UDP: nothing a glance can catch");
        // A glimpsed socket still open at the next sample is followed by the sample.
        let mut s7 = sock(7, "10.0.0.1:40007", "192.0.2.1:443", 5, 1);
        s7.inode = 9;
        t.glance(std::slice::from_ref(&s7), 1700, owner);
        s7.inode = 0; // as if the owner walk had not found it: the glance's owner is kept
        t.observe_dump(&[s7], 2000, NOBODY, &mut out);
        assert_eq!(out.last().map(|c| c.pid), Some(Some(77)));
        assert!(t.glimpsed.is_empty());
    }

    #[test]
    fn events_before_the_baseline_only_end_tracking() {
        let mut t = Tracker::default();
        let mut out = vec![];
        t.observe_dump(
            &[sock(1, "10.0.0.1:40000", "192.0.2.1:443", 100, 50)],
            1000,
            NOBODY,
            &mut out,
        );
        let ev = [sock(1, "10.0.0.1:40000", "192.0.2.1:443", 900, 50)];
        assert_eq!(t.absorb_destroyed(&ev, 1000, &mut out), 1);
        assert!(out.is_empty(), "baseline: nothing counted");
        assert_eq!(t.finish(1000, true), 0);
        t.observe_dump(&[], 2000, NOBODY, &mut out);
        assert_eq!(t.vanished(), 0, "not waiting for an event already seen");
    }

    #[test]
    fn a_socket_gone_without_event_is_missed_later_with_subscription_and_at_once_without() {
        let mut t = Tracker::default();
        let mut out = vec![];
        t.observe_dump(
            &[sock(1, "10.0.0.1:40000", "192.0.2.1:443", 100, 50)],
            1000,
            NOBODY,
            &mut out,
        );
        assert_eq!(t.finish(1000, true), 0);
        t.observe_dump(&[], 2000, NOBODY, &mut out);
        assert_eq!(t.finish(2000, true), 0, "still waiting for its event");
        assert_eq!(t.finish(2000 + VANISHED_KEEP_MS + 1, true), 1);
        t.observe_dump(
            &[sock(2, "10.0.0.1:40000", "192.0.2.1:443", 100, 50)],
            3000,
            NOBODY,
            &mut out,
        );
        assert_eq!(t.finish(3000, true), 0);
        t.observe_dump(&[], 4000, NOBODY, &mut out);
        assert_eq!(t.finish(4000, false), 1, "no subscription: lost at once");
    }

    #[test]
    fn direction_is_inbound_on_a_listening_port_and_inbound_flows_aggregate_client_ports() {
        let mut t = Tracker::default();
        let mut out = vec![];
        let mut listener = sock(9, "10.0.0.1:8080", "0.0.0.0:0", 0, 0);
        listener.state = TCP_LISTEN;
        listener.tcp = None;
        t.observe_dump(&[listener.clone()], 1000, NOBODY, &mut out);
        assert_eq!(t.finish(1000, true), 0);
        t.observe_dump(
            &[
                listener,
                sock(1, "10.0.0.1:8080", "192.0.2.1:50000", 10, 1000),
                sock(2, "10.0.0.1:8080", "192.0.2.1:50001", 10, 1000),
                sock(3, "10.0.0.1:50002", "192.0.2.1:8080", 5, 5),
            ],
            2000,
            NOBODY,
            &mut out,
        );
        assert_eq!(t.finish(2000, true), 0);
        assert_eq!(out[0].direction, pb::Direction::Inbound);
        assert_eq!(out[2].direction, pb::Direction::Outbound);
        let mut table = FlowTable::new(Filter::default(), 100);
        for c in &out {
            table.add(c);
        }
        let (flows, _) = table.take(100);
        assert_eq!(flows.len(), 2);
        let inbound = flows
            .iter()
            .find(|f| f.direction == pb::Direction::Inbound as i32)
            .unwrap();
        assert_eq!((inbound.local_port, inbound.remote_port), (8080, 0));
        assert_eq!(inbound.connections, 2);
        assert_eq!(inbound.bytes_received, 2000);
        let outbound = flows
            .iter()
            .find(|f| f.direction == pb::Direction::Outbound as i32)
            .unwrap();
        assert_eq!((outbound.local_port, outbound.remote_port), (0, 8080));
        assert_eq!(outbound.local_address, "10.0.0.1");
    }

    #[test]
    fn flows_beyond_the_bound_are_summed_into_one_other_flow_per_process() {
        let mut t = FlowTable::new(Filter::default(), 1000);
        for i in 0..10u64 {
            t.add(&contribution(
                1,
                &format!("192.0.2.{}:443", i + 1),
                100 * (i + 1),
                i,
            ));
        }
        t.add(&contribution(2, "198.51.100.1:443", 5, 99));
        let (flows, dropped) = t.take(4);
        assert_eq!(flows.len(), 4);
        let total: u64 = flows.iter().map(|f| f.bytes_sent).sum();
        assert_eq!(total, 100 * 55 + 5, "no byte lost in folding");
        let others: Vec<_> = flows
            .iter()
            .filter(|f| f.remote_address == OTHER_REMOTE)
            .collect();
        assert_eq!(others.len(), 2, "one other flow per process");
        assert_eq!(dropped, 9);
        assert!(flows[0].bytes_sent >= flows[1].bytes_sent);
        assert!(t.is_empty());
    }

    #[test]
    fn the_table_never_holds_more_than_its_bound_and_counts_what_it_folded() {
        let mut t = FlowTable::new(Filter::default(), 3);
        for i in 0..10u64 {
            t.add(&contribution(1, &format!("192.0.2.{}:443", i + 1), 1, i));
        }
        assert_eq!(t.len(), 4, "three flows and the process's other flow");
        let (flows, dropped) = t.take(100);
        assert_eq!(dropped, 7);
        let other = flows
            .iter()
            .find(|f| f.remote_address == OTHER_REMOTE)
            .unwrap();
        assert_eq!((other.connections, other.bytes_sent), (7, 7));
    }
}
