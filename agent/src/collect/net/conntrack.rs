//! UDP byte counts from the kernel's connection tracking (`NETLINK_NETFILTER`, ctnetlink):
//! one dump of the conntrack table of one network namespace, kept for UDP entries, and the
//! decoder of one entry.
//!
//! sock_diag has no byte counters for UDP sockets; connection tracking does, per direction,
//! when accounting is on in that namespace (`net.netfilter.nf_conntrack_acct = 1`, per network
//! namespace, off by default) and when something makes netfilter track the namespace's traffic
//! (a firewall rule that uses connection state, NAT, Kubernetes' kube-proxy). An entry created
//! while accounting was off never gets counters. So a namespace is in one of three states,
//! [`UdpAccounting`]: counted, entries without counters (accounting off), or no entries for
//! its UDP sockets (not tracked).
//!
//! Counters are IP packet lengths: [`payload_bytes`] takes each counted packet's IP and UDP
//! headers off (20 + 8 bytes for IPv4, 40 + 8 for IPv6; IP options and extension headers, rare
//! on UDP, are not seen) so that the bytes read like `tcp_info`'s payload bytes.
//!
//! The agent only reads. It never changes a firewall; with `[net] conntrack_accounting = true`
//! (off by default) it sets `nf_conntrack_acct = 1` in the namespaces it observes
//! ([`enable_accounting`]), which is the whole remedy when the namespace is already tracked.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_NETFILTER};

/// ctnetlink's subsystem id.
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// `IPCTNL_MSG_CT_GET`: the dump request.
const IPCTNL_MSG_CT_GET: u16 = 1;
/// `IPCTNL_MSG_CT_NEW`: each dumped entry.
const IPCTNL_MSG_CT_NEW: u16 = 0;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr` and `struct nfgenmsg`.
const NLMSG_HDR: usize = 16;
const NFGENMSG: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const IPPROTO_UDP: u8 = 17;
/// Receive buffer for one `recv` of a dump.
const RECV_BUFFER: usize = 64 * 1024;
/// Most UDP entries kept from one dump; beyond it the rest are not measured this sample.
pub const MAX_UDP_ENTRIES: usize = 262_144;
/// IPv4 + UDP header bytes per packet.
pub const V4_HEADERS: u64 = 20 + 8;
/// IPv6 + UDP header bytes per packet.
pub const V6_HEADERS: u64 = 40 + 8;
/// The sysctl that turns accounting on, per network namespace.
pub const ACCT_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_acct";

/// Why a conntrack dump failed.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// The `NETLINK_NETFILTER` socket could not be opened (no `CONFIG_NF_CT_NETLINK`,
    /// seccomp).
    #[error("cannot open a NETLINK_NETFILTER socket")]
    Open(#[source] io::Error),
    /// Sending or receiving failed.
    #[error("netlink i/o failed")]
    Io(#[source] io::Error),
    /// The kernel refused the dump (no `CAP_NET_ADMIN`).
    #[error("the kernel refused the conntrack dump")]
    Refused(#[source] io::Error),
    /// A message could not be decoded.
    #[error("malformed conntrack message: {0}")]
    Decode(String),
}

/// Packets and bytes one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Packets counted.
    pub packets: u64,
    /// IP bytes counted (headers included).
    pub bytes: u64,
}

/// One UDP conntrack entry: its original-direction tuple and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Who sent the first packet.
    pub src: SocketAddr,
    /// To whom.
    pub dst: SocketAddr,
    /// Counted original-direction packets (src → dst); `None` without accounting.
    pub orig: Option<Counters>,
    /// Counted reply-direction packets (dst → src).
    pub reply: Option<Counters>,
}

/// What a namespace's conntrack says about its UDP sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpAccounting {
    /// Entries with counters: UDP bytes are measured.
    Counted,
    /// Entries without counters: `nf_conntrack_acct` is off.
    Off,
    /// No entry for its connected UDP sockets: netfilter does not track the namespace.
    Untracked,
}

/// `payload` bytes of counted packets: IP length less the IP and UDP headers of each packet.
pub fn payload_bytes(c: Counters, v6: bool) -> u64 {
    let per = if v6 { V6_HEADERS } else { V4_HEADERS };
    c.bytes.saturating_sub(c.packets.saturating_mul(per))
}

/// The local side's (sent, received) payload bytes of a UDP socket `local` ↔ `remote`, when
/// an entry of `entries` is its flow (in either direction) and has counters.
pub fn socket_bytes(
    entries: &HashMap<(SocketAddr, SocketAddr), Entry>,
    local: SocketAddr,
    remote: SocketAddr,
) -> Option<Result<(u64, u64), UdpAccounting>> {
    let (l, r) = (canonical(local), canonical(remote));
    let v6 = r.is_ipv6();
    if let Some(e) = entries.get(&(l, r)) {
        return Some(match (e.orig, e.reply) {
            (Some(o), Some(p)) => Ok((payload_bytes(o, v6), payload_bytes(p, v6))),
            _ => Err(UdpAccounting::Off),
        });
    }
    let e = entries.get(&(r, l))?;
    Some(match (e.orig, e.reply) {
        (Some(o), Some(p)) => Ok((payload_bytes(p, v6), payload_bytes(o, v6))),
        _ => Err(UdpAccounting::Off),
    })
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// One open ctnetlink socket, bound to the namespace it was opened in.
#[derive(Debug)]
pub struct Conntrack {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Conntrack {
    /// Open the socket (in the calling thread's network namespace).
    pub fn open() -> Result<Self, ConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Open)?;
        socket.bind_auto().map_err(ConntrackError::Open)?;
        socket
            .connect(&NetlinkAddr::new(0, 0))
            .map_err(ConntrackError::Open)?;
        Ok(Self {
            socket,
            seq: 0,
            // Allocated at the first dump: most pods hold no UDP socket and are never dumped.
            buf: Vec::new(),
        })
    }

    /// Dump the table and keep its UDP entries (both families), keyed by (src, dst) of the
    /// original direction, at most [`MAX_UDP_ENTRIES`]; returns how many were left out.
    pub fn dump_udp(
        &mut self,
        out: &mut HashMap<(SocketAddr, SocketAddr), Entry>,
    ) -> Result<usize, ConntrackError> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = Vec::with_capacity(NLMSG_HDR + NFGENMSG);
        req.extend_from_slice(&((NLMSG_HDR + NFGENMSG) as u32).to_ne_bytes());
        req.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
        req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: AF_UNSPEC (every family), version 0, resource id 0.
        req.extend_from_slice(&[0, 0, 0, 0]);
        self.socket.send(&req, 0).map_err(ConntrackError::Io)?;
        if self.buf.len() != RECV_BUFFER {
            self.buf = vec![0; RECV_BUFFER];
        }
        let mut left_out = 0;
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(ConntrackError::Io)?;
            let n = n.min(self.buf.len());
            let mut off = 0;
            while off + NLMSG_HDR <= n {
                let h = &self.buf[off..n];
                let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
                if len < NLMSG_HDR || len > h.len() {
                    return Err(ConntrackError::Decode(format!(
                        "message length {len} at offset {off} of {n}"
                    )));
                }
                let kind = u16::from_ne_bytes([h[4], h[5]]);
                let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
                let body = &h[NLMSG_HDR..len];
                off += len.div_ceil(4) * 4;
                if seq != self.seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(left_out),
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(0);
                        if code != 0 {
                            return Err(ConntrackError::Refused(io::Error::from_raw_os_error(
                                -code,
                            )));
                        }
                    }
                    k if k == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => {
                        if let Some(e) = decode(body.get(NFGENMSG..).unwrap_or_default()) {
                            if out.len() < MAX_UDP_ENTRIES {
                                out.insert((e.src, e.dst), e);
                            } else {
                                left_out += 1;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The attributes of a netlink attribute stream: (type without flags, value).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = b.get(len.div_ceil(4) * 4..).unwrap_or_default();
        Some((kind, value))
    })
}

fn be64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
}

fn be16(v: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?))
}

fn counters(v: &[u8]) -> Option<Counters> {
    let mut c = Counters::default();
    let (mut p, mut b) = (false, false);
    for (k, val) in attrs(v) {
        match k {
            CTA_COUNTERS_PACKETS => {
                c.packets = be64(val)?;
                p = true;
            }
            CTA_COUNTERS_BYTES => {
                c.bytes = be64(val)?;
                b = true;
            }
            _ => {}
        }
    }
    (p && b).then_some(c)
}

/// (protocol, src, dst) of a `CTA_TUPLE_*` attribute.
fn tuple(v: &[u8]) -> Option<(u8, SocketAddr, SocketAddr)> {
    let (mut src, mut dst) = (None, None);
    let (mut proto, mut sport, mut dport) = (None, None, None);
    for (k, val) in attrs(v) {
        match k {
            CTA_TUPLE_IP => {
                for (ik, iv) in attrs(val) {
                    match ik {
                        CTA_IP_V4_SRC => {
                            src = Some(IpAddr::V4(Ipv4Addr::from(
                                <[u8; 4]>::try_from(iv.get(..4)?).ok()?,
                            )))
                        }
                        CTA_IP_V4_DST => {
                            dst = Some(IpAddr::V4(Ipv4Addr::from(
                                <[u8; 4]>::try_from(iv.get(..4)?).ok()?,
                            )))
                        }
                        CTA_IP_V6_SRC => {
                            src = Some(IpAddr::V6(Ipv6Addr::from(
                                <[u8; 16]>::try_from(iv.get(..16)?).ok()?,
                            )))
                        }
                        CTA_IP_V6_DST => {
                            dst = Some(IpAddr::V6(Ipv6Addr::from(
                                <[u8; 16]>::try_from(iv.get(..16)?).ok()?,
                            )))
                        }
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (pk, pv) in attrs(val) {
                    match pk {
                        CTA_PROTO_NUM => proto = pv.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = be16(pv),
                        CTA_PROTO_DST_PORT => dport = be16(pv),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        proto?,
        SocketAddr::new(src?, sport?),
        SocketAddr::new(dst?, dport?),
    ))
}

/// Decode one dumped entry (after its `nfgenmsg`); `None` for other protocols or a malformed
/// entry.
pub fn decode(body: &[u8]) -> Option<Entry> {
    let mut orig_tuple = None;
    let (mut orig, mut reply) = (None, None);
    for (k, v) in attrs(body) {
        match k {
            CTA_TUPLE_ORIG => orig_tuple = tuple(v),
            CTA_COUNTERS_ORIG => orig = counters(v),
            CTA_COUNTERS_REPLY => reply = counters(v),
            _ => {}
        }
    }
    let (proto, src, dst) = orig_tuple?;
    (proto == IPPROTO_UDP).then_some(Entry {
        src,
        dst,
        orig,
        reply,
    })
}

/// Set `nf_conntrack_acct = 1` in the calling thread's network namespace (the opt-in remedy;
/// the sysctl file answers for the namespace of whoever opens it).
pub fn enable_accounting() -> io::Result<()> {
    std::fs::write(ACCT_SYSCTL, b"1\n")
}

/// What the agent logs once per namespace whose UDP bytes cannot be measured.
pub fn remedy(state: UdpAccounting, netns: u64, pid: Option<u32>) -> String {
    let enter = match pid {
        Some(pid) if netns != 0 => format!("nsenter --net=/proc/{pid}/ns/net "),
        _ => String::new(),
    };
    match state {
        UdpAccounting::Counted => String::new(),
        UdpAccounting::Off => format!(
            "UDP bytes are unmeasured in network namespace {netns}: connection tracking accounting \
             is off there. Enable it with `{enter}sysctl -w net.netfilter.nf_conntrack_acct=1` \
             (or set [net] conntrack_accounting = true and the agent sets it); connections \
             opened before then stay uncounted"
        ),
        UdpAccounting::Untracked => format!(
            "UDP bytes are unmeasured in network namespace {netns}: netfilter does not track its \
             connections (no firewall rule uses connection state there). Tracking needs such a \
             rule (e.g. `{enter}nft add rule inet filter output ct state established accept` in an \
             output chain) and `{enter}sysctl -w net.netfilter.nf_conntrack_acct=1`; the agent \
             never changes a firewall"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(value);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        nla(kind | 0x8000, &parts.concat())
    }

    fn entry(counted: bool) -> Vec<u8> {
        entry_of(counted, IPPROTO_UDP)
    }

    fn entry_of(counted: bool, proto: u8) -> Vec<u8> {
        let tuple = |kind, a: [u8; 4], b: [u8; 4], sp: u16, dp: u16| {
            nested(
                kind,
                &[
                    nested(
                        CTA_TUPLE_IP,
                        &[nla(CTA_IP_V4_SRC, &a), nla(CTA_IP_V4_DST, &b)],
                    ),
                    nested(
                        CTA_TUPLE_PROTO,
                        &[
                            nla(CTA_PROTO_NUM, &[proto]),
                            nla(CTA_PROTO_SRC_PORT, &sp.to_be_bytes()),
                            nla(CTA_PROTO_DST_PORT, &dp.to_be_bytes()),
                        ],
                    ),
                ],
            )
        };
        let mut b = tuple(CTA_TUPLE_ORIG, [10, 0, 0, 1], [10, 0, 0, 2], 40000, 443);
        b.extend(tuple(2, [10, 0, 0, 2], [10, 0, 0, 1], 443, 40000));
        if counted {
            let c = |p: u64, by: u64| {
                [
                    nla(CTA_COUNTERS_PACKETS, &p.to_be_bytes()),
                    nla(CTA_COUNTERS_BYTES, &by.to_be_bytes()),
                ]
            };
            b.extend(nested(CTA_COUNTERS_ORIG, &c(5000, 5_140_000)));
            b.extend(nested(CTA_COUNTERS_REPLY, &c(10, 1280)));
        }
        b
    }

    #[test]
    fn an_entry_is_decoded_with_its_tuple_and_counters_and_headers_come_off() {
        let e = decode(&entry(true)).unwrap();
        assert_eq!(e.src, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(e.dst, "10.0.0.2:443".parse().unwrap());
        let orig = e.orig.unwrap();
        assert_eq!((orig.packets, orig.bytes), (5000, 5_140_000));
        // 5,000 datagrams of 1,000 bytes: 5,000,000 bytes of payload.
        assert_eq!(payload_bytes(orig, false), 5_000_000);
        assert_eq!(payload_bytes(e.reply.unwrap(), false), 1000);
        let map = HashMap::from([((e.src, e.dst), e)]);
        let local: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "10.0.0.2:443".parse().unwrap();
        assert_eq!(
            socket_bytes(&map, local, remote),
            Some(Ok((5_000_000, 1000)))
        );
        // The server side of the same flow: the directions swap.
        assert_eq!(
            socket_bytes(&map, remote, local),
            Some(Ok((1000, 5_000_000)))
        );
        // An IPv4-mapped socket address finds the IPv4 entry.
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:40000".parse().unwrap();
        assert_eq!(
            socket_bytes(&map, mapped, remote),
            Some(Ok((5_000_000, 1000)))
        );
        assert_eq!(
            socket_bytes(&map, local, "10.0.0.3:443".parse().unwrap()),
            None
        );
    }

    #[test]
    fn an_entry_without_counters_means_accounting_is_off() {
        let e = decode(&entry(false)).unwrap();
        assert_eq!((e.orig, e.reply), (None, None));
        let map = HashMap::from([((e.src, e.dst), e)]);
        assert_eq!(
            socket_bytes(&map, e.src, e.dst),
            Some(Err(UdpAccounting::Off))
        );
        let text = remedy(UdpAccounting::Off, 4026532000, Some(42));
        assert!(
            text.contains(
                "nsenter --net=/proc/42/ns/net sysctl -w net.netfilter.nf_conntrack_acct=1"
            ),
            "{text}"
        );
    }

    #[test]
    fn truncated_or_foreign_entries_are_not_decoded() {
        let full = entry(true);
        for cut in [0, 3, 10, full.len() / 2] {
            // Never a panic; a cut tuple is no entry.
            let _ = decode(&full[..cut]);
        }
        assert_eq!(decode(&full[..8]), None);
        assert_eq!(decode(&entry_of(true, 6)), None, "TCP entries are not kept");
    }
}
