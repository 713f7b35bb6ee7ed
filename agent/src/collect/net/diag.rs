//! sock_diag netlink (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY`): one dump of the TCP and UDP
//! sockets of both address families, and the decoder of one `inet_diag_msg` (with its `tcp_info`)
//! that the destroy-event listener ([`super::destroy`]) shares.
//!
//! The dump asks for every TCP state except `TIME_WAIT` (a time-wait socket carries no
//! `tcp_info`, no inode and no owner: its last bytes were already delivered by the destroy event
//! of the full socket) and `SYN_RECV` (request sockets, no data yet). UDP sockets are dumped in
//! every state: `ESTABLISHED` means connected (a remote endpoint), `CLOSE` means bound only.
//!
//! `tcp_info` is decoded with `netlink-packet-sock-diag`'s `TcpInfo` (feature `rich_nlas`). That
//! decoder wants the whole structure of kernel 5.4 and later; on an older kernel (a shorter
//! structure, e.g. RHEL 8's 4.18) the few fields used here are read at their fixed offsets
//! instead, so the counters stay available back to Linux 4.6 (`tcpi_min_rtt`).

use std::io;
use std::net::SocketAddr;

use netlink_packet_core::{
    Emitable, ErrorBuffer, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NlasIterator, Parseable,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{
    AF_INET, AF_INET6, INET_DIAG_INFO, INET_DIAG_PROTOCOL, IPPROTO_TCP, IPPROTO_UDP,
    SOCK_DIAG_BY_FAMILY,
};
use netlink_packet_sock_diag::inet::nlas::TcpInfo;
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};
use sov_proto::pb;

use super::{ObservedSocket, TcpCounters};

/// Receive buffer for one `recv` of a dump: the kernel fills at most 32 KiB per dump message
/// batch, so 64 KiB is never truncated.
pub const DUMP_RECV_BUFFER: usize = 64 * 1024;
/// Netlink messages are aligned on 4 bytes.
const NLMSG_ALIGNTO: usize = 4;
/// Offsets in `struct tcp_info` (stable ABI: fields are only ever appended).
const TCPI_RTT: usize = 68;
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;
const TCPI_MIN_RTT: usize = 148;
/// `TCPDIAG_GETSOCK`: the original `inet_diag` request (`struct inet_diag_req`), still served by
/// every kernel; its dump covers both address families in one walk of the TCP hash tables.
const TCPDIAG_GETSOCK: u16 = 18;
/// `sizeof(struct inet_diag_req)`: family, source and destination prefix lengths, extensions
/// (4 bytes), `struct inet_diag_sockid` (48), states and tables (8).
const INET_DIAG_REQ_LEN: usize = 60;
/// Netlink header length.
const NLMSG_HDRLEN: usize = 16;
/// `ENOENT`: what an exact lookup of a socket that no longer exists answers.
const ENOENT: i32 = 2;
/// `ESTALE`: the addresses and ports found a socket with another cookie.
const ESTALE: i32 = 116;
/// `MSG_DONTWAIT`.
const MSG_DONTWAIT: i32 = 0x40;
/// Exact lookups sent in one `send` ([`Dumper::lookup_many`]): the kernel answers them all
/// before `send` returns, each answer queued on the receive buffer (about 1.3 KiB of it for a
/// socket with its `tcp_info`, of the default 208 KiB); an answer that does not fit is dropped.
pub const LOOKUP_BATCH: usize = 48;

/// Why a dump (or a destroy-event subscription) failed.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    /// `socket(AF_NETLINK, SOCK_DGRAM, NETLINK_SOCK_DIAG)`, `bind` or `connect` failed.
    #[error("cannot open a NETLINK_SOCK_DIAG socket")]
    Open(#[source] io::Error),
    /// Sending the request or receiving the answer failed.
    #[error("netlink i/o failed")]
    Io(#[source] io::Error),
    /// The kernel answered the request with an error.
    #[error("the kernel refused the sock_diag request")]
    Refused(#[source] io::Error),
    /// A message could not be decoded.
    #[error("malformed sock_diag message: {0}")]
    Decode(String),
    /// `add_membership` on a destroy group failed.
    #[error("cannot join sock_diag multicast group {group}")]
    Join {
        /// The `SKNLGRP_*` group number.
        group: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

thread_local! {
    /// The receive buffer of every [`Dumper`] used on this thread (one per namespace would
    /// keep [`DUMP_RECV_BUFFER`] resident for each of hundreds of pods).
    static RECEIVE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// This thread's receive buffer (allocated at its first use).
fn take_buffer() -> Vec<u8> {
    let b = RECEIVE.with(std::cell::Cell::take);
    if b.len() == DUMP_RECV_BUFFER {
        b
    } else {
        vec![0; DUMP_RECV_BUFFER]
    }
}

/// Give this thread's receive buffer back.
fn put_buffer(b: Vec<u8>) {
    RECEIVE.with(|c| c.set(b));
}

/// One open `NETLINK_SOCK_DIAG` socket used for dumps.
#[derive(Debug)]
pub struct Dumper {
    socket: Socket,
    seq: u32,
    /// Whether the one-walk TCP dump of both families ([`TCPDIAG_GETSOCK`]) works here
    /// (`None`: not tried yet).
    both_families: Option<bool>,
}

impl Dumper {
    /// Open and connect the netlink socket. Fails where netlink is refused (seccomp, no
    /// `CONFIG_INET_DIAG`).
    pub fn open() -> Result<Self, DiagError> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(DiagError::Open)?;
        socket.bind_auto().map_err(DiagError::Open)?;
        socket
            .connect(&NetlinkAddr::new(0, 0))
            .map_err(DiagError::Open)?;
        Ok(Self {
            socket,
            seq: 0,
            both_families: None,
        })
    }

    /// Dump every TCP and UDP socket of both families (four requests) into `out`.
    pub fn dump_all(&mut self, out: &mut Vec<ObservedSocket>) -> Result<(), DiagError> {
        self.dump_where(out, |_, _| true)
    }

    /// [`Dumper::dump_all`] for the (IPv6?, TCP?) pairs `wanted` accepts only.
    pub fn dump_where(
        &mut self,
        out: &mut Vec<ObservedSocket>,
        wanted: impl Fn(bool, bool) -> bool,
    ) -> Result<(), DiagError> {
        // TCP of both families in one walk of the node-wide hash tables where the kernel
        // serves it (a dump walks every bucket whatever the namespace holds: two family dumps
        // walk them twice).
        let mut tcp_done = false;
        if wanted(false, true) && wanted(true, true) && self.both_families != Some(false) {
            let at = out.len();
            match self.dump_tcp_both_families(out) {
                Ok(()) => {
                    self.both_families = Some(true);
                    tcp_done = true;
                }
                Err(e) => {
                    out.truncate(at);
                    tracing::debug!(error = %e, "one-walk TCP dump refused; one dump per family");
                    self.both_families = Some(false);
                }
            }
        }
        for family in [AF_INET, AF_INET6] {
            for protocol in [IPPROTO_TCP, IPPROTO_UDP] {
                if tcp_done && protocol == IPPROTO_TCP {
                    continue;
                }
                if wanted(family == AF_INET6, protocol == IPPROTO_TCP) {
                    self.dump(family, protocol, out)?;
                }
            }
        }
        Ok(())
    }

    /// Whether the socket `s` of an earlier dump is still open with a descriptor somewhere
    /// (one exact lookup by addresses, ports and cookie: a hash lookup in the kernel, no
    /// walk): false when it is gone or orphaned (closed by its process, inode 0). An answer
    /// that is neither is taken as open.
    pub fn still_open(&mut self, s: &ObservedSocket) -> bool {
        match self.lookup(s) {
            Ok(found) => found.is_some_and(|f| f.inode != 0),
            Err(DiagError::Refused(e)) if e.raw_os_error() == Some(ENOENT) => false,
            Err(_) => true,
        }
    }

    /// Look each socket of `socks` up exactly (addresses, ports and cookie: a hash lookup in
    /// the kernel, no walk of the tables), TCP ones with their `tcp_info`: the sockets found go
    /// to `found`, the ones that are gone to `gone`. An `Err` when an answer is missing or
    /// malformed (the caller dumps instead).
    pub fn lookup_many(
        &mut self,
        socks: &[ObservedSocket],
        found: &mut Vec<ObservedSocket>,
        gone: &mut Vec<ObservedSocket>,
    ) -> Result<(), DiagError> {
        for batch in socks.chunks(LOOKUP_BATCH) {
            self.lookup_batch(batch, found, gone)?;
        }
        Ok(())
    }

    fn lookup_batch(
        &mut self,
        batch: &[ObservedSocket],
        found: &mut Vec<ObservedSocket>,
        gone: &mut Vec<ObservedSocket>,
    ) -> Result<(), DiagError> {
        let mut buf = take_buffer();
        let r = self.lookup_batch_with(&mut buf, batch, found, gone);
        put_buffer(buf);
        r
    }

    fn lookup_batch_with(
        &mut self,
        buf: &mut [u8],
        batch: &[ObservedSocket],
        found: &mut Vec<ObservedSocket>,
        gone: &mut Vec<ObservedSocket>,
    ) -> Result<(), DiagError> {
        let first = self.seq.wrapping_add(1);
        let mut req = Vec::with_capacity(batch.len() * 80);
        for s in batch {
            let request = exact_request(s, s.protocol == pb::Protocol::Tcp);
            self.seq = self.seq.wrapping_add(1);
            // No NLM_F_ACK: each request gets exactly one answer, the socket or an error.
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST;
            header.sequence_number = self.seq;
            let mut packet =
                NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
            packet.finalize();
            let at = req.len();
            req.resize(at + packet.buffer_len(), 0);
            packet.serialize(&mut req[at..]);
            // Messages are 4-byte aligned (an InetRequest is 72 bytes: already aligned).
            req.resize(req.len().div_ceil(NLMSG_ALIGNTO) * NLMSG_ALIGNTO, 0);
        }
        self.socket.send(&req, 0).map_err(DiagError::Io)?;
        // Every answer is queued by now (the kernel serves a request inside `send`): read
        // without blocking, so that an answer dropped on a full buffer ends in an error, not
        // in a wait.
        let mut answered = vec![false; batch.len()];
        let mut left = batch.len();
        while left > 0 {
            let n = match self.socket.recv(&mut &mut buf[..], MSG_DONTWAIT) {
                Ok(n) => n.min(buf.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(DiagError::Decode(format!(
                        "{left} of {} exact lookups unanswered",
                        batch.len()
                    )));
                }
                Err(e) => return Err(DiagError::Io(e)),
            };
            let mut off = 0;
            while off < n {
                let msg = NetlinkBuffer::new_checked(&buf[off..n])
                    .map_err(|e| DiagError::Decode(e.to_string()))?;
                let len = msg.length() as usize;
                if len == 0 {
                    break;
                }
                off += len.div_ceil(NLMSG_ALIGNTO) * NLMSG_ALIGNTO;
                let i = msg.sequence_number().wrapping_sub(first) as usize;
                let Some((s, done)) = batch.get(i).zip(answered.get_mut(i)) else {
                    continue; // left over from an earlier request
                };
                if *done {
                    continue;
                }
                match msg.message_type() {
                    NLMSG_ERROR => {
                        let code = ErrorBuffer::new_checked(msg.payload())
                            .map_err(|e| DiagError::Decode(e.to_string()))?
                            .code();
                        match code.map(|c| -c.get()) {
                            // Gone, or another socket with its addresses (a time-wait one).
                            Some(ENOENT | ESTALE) => gone.push(s.clone()),
                            Some(code) => {
                                return Err(DiagError::Refused(io::Error::from_raw_os_error(code)));
                            }
                            None => continue, // an acknowledgement: not an answer
                        }
                    }
                    SOCK_DIAG_BY_FAMILY => {
                        let f = decode(msg.payload(), s.protocol)?;
                        if f.protocol == pb::Protocol::Tcp && f.tcp.is_none() {
                            // Its time-wait successor (same cookie, no tcp_info): the full
                            // socket is gone, its destroy event brings its last counters.
                            gone.push(s.clone());
                        } else {
                            found.push(f);
                        }
                    }
                    _ => continue,
                }
                *done = true;
                left -= 1;
            }
        }
        Ok(())
    }

    fn lookup(&mut self, s: &ObservedSocket) -> Result<Option<ObservedSocket>, DiagError> {
        let mut buf = take_buffer();
        let r = self.lookup_with(&mut buf, s);
        put_buffer(buf);
        r
    }

    fn lookup_with(
        &mut self,
        buf: &mut [u8],
        s: &ObservedSocket,
    ) -> Result<Option<ObservedSocket>, DiagError> {
        let request = exact_request(s, false);
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
        packet.finalize();
        let mut req = vec![0; packet.buffer_len()];
        packet.serialize(&mut req);
        self.socket.send(&req, 0).map_err(DiagError::Io)?;
        let mut found = None;
        loop {
            let n = self
                .socket
                .recv(&mut &mut buf[..], 0)
                .map_err(DiagError::Io)?;
            let n = n.min(buf.len());
            let mut off = 0;
            while off < n {
                let msg = NetlinkBuffer::new_checked(&buf[off..n])
                    .map_err(|e| DiagError::Decode(e.to_string()))?;
                let len = msg.length() as usize;
                if len == 0 {
                    break;
                }
                off += len.div_ceil(NLMSG_ALIGNTO) * NLMSG_ALIGNTO;
                if msg.sequence_number() != self.seq {
                    continue;
                }
                match msg.message_type() {
                    // The acknowledgement (code 0) or the refusal ends the answer.
                    NLMSG_ERROR => {
                        let code = ErrorBuffer::new_checked(msg.payload())
                            .map_err(|e| DiagError::Decode(e.to_string()))?
                            .code();
                        return match code {
                            Some(code) => Err(DiagError::Refused(io::Error::from_raw_os_error(
                                -code.get(),
                            ))),
                            None => Ok(found),
                        };
                    }
                    NLMSG_DONE => return Ok(found),
                    SOCK_DIAG_BY_FAMILY => found = Some(decode(msg.payload(), s.protocol)?),
                    _ => {}
                }
            }
        }
    }

    /// Dump the TCP sockets of both families with one `TCPDIAG_GETSOCK` request (same states
    /// and `tcp_info` as [`Dumper::dump`]).
    pub fn dump_tcp_both_families(
        &mut self,
        out: &mut Vec<ObservedSocket>,
    ) -> Result<(), DiagError> {
        let states = StateFlags::all() - StateFlags::TIME_WAIT - StateFlags::SYN_RECV;
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDRLEN + INET_DIAG_REQ_LEN;
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
        req.extend_from_slice(&TCPDIAG_GETSOCK.to_ne_bytes());
        req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        // struct inet_diag_req: the family is ignored by this dump (it answers both).
        req.extend_from_slice(&[AF_INET, 0, 0, ExtensionFlags::INFO.bits()]);
        req.extend_from_slice(&[0u8; 48]); // struct inet_diag_sockid: no filter
        req.extend_from_slice(&states.bits().to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes()); // idiag_dbs
        self.socket.send(&req, 0).map_err(DiagError::Io)?;
        self.receive(pb::Protocol::Tcp, out)
    }

    /// Dump the sockets of one family (`AF_INET`, `AF_INET6`) and protocol (`IPPROTO_TCP`,
    /// `IPPROTO_UDP`) into `out`; TCP sockets carry their `tcp_info` counters.
    pub fn dump(
        &mut self,
        family: u8,
        protocol: u8,
        out: &mut Vec<ObservedSocket>,
    ) -> Result<(), DiagError> {
        let tcp = protocol == IPPROTO_TCP;
        let states = if tcp {
            StateFlags::all() - StateFlags::TIME_WAIT - StateFlags::SYN_RECV
        } else {
            StateFlags::all()
        };
        let request = InetRequest {
            family,
            protocol,
            extensions: if tcp {
                ExtensionFlags::INFO
            } else {
                ExtensionFlags::empty()
            },
            states,
            socket_id: if family == AF_INET6 {
                SocketId::new_v6()
            } else {
                SocketId::new_v4()
            },
        };
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
        packet.finalize();
        let mut req = vec![0; packet.buffer_len()];
        packet.serialize(&mut req);
        self.socket.send(&req, 0).map_err(DiagError::Io)?;
        let hint = if tcp {
            pb::Protocol::Tcp
        } else {
            pb::Protocol::Udp
        };
        self.receive(hint, out)
    }

    /// Receive the answer to the latest request (sequence number `self.seq`) into `out`.
    fn receive(
        &mut self,
        hint: pb::Protocol,
        out: &mut Vec<ObservedSocket>,
    ) -> Result<(), DiagError> {
        let mut buf = take_buffer();
        let r = self.receive_with(&mut buf, hint, out);
        put_buffer(buf);
        r
    }

    fn receive_with(
        &mut self,
        buf: &mut [u8],
        hint: pb::Protocol,
        out: &mut Vec<ObservedSocket>,
    ) -> Result<(), DiagError> {
        loop {
            let n = self
                .socket
                .recv(&mut &mut buf[..], 0)
                .map_err(DiagError::Io)?;
            if n > buf.len() {
                return Err(DiagError::Decode(format!(
                    "datagram of {n} bytes truncated"
                )));
            }
            let mut off = 0;
            while off < n {
                let msg = NetlinkBuffer::new_checked(&buf[off..n])
                    .map_err(|e| DiagError::Decode(e.to_string()))?;
                let len = msg.length() as usize;
                if len == 0 {
                    break;
                }
                off += len.div_ceil(NLMSG_ALIGNTO) * NLMSG_ALIGNTO;
                if msg.sequence_number() != self.seq {
                    // Left over from an earlier, abandoned dump.
                    continue;
                }
                match msg.message_type() {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = ErrorBuffer::new_checked(msg.payload())
                            .map_err(|e| DiagError::Decode(e.to_string()))?
                            .code();
                        if let Some(code) = code {
                            return Err(DiagError::Refused(io::Error::from_raw_os_error(
                                -code.get(),
                            )));
                        }
                    }
                    SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => {
                        out.push(decode(msg.payload(), hint)?);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Decode one `inet_diag_msg` and its attributes. `hint` is the protocol when the message does
/// not say (dumps); destroy events carry `INET_DIAG_PROTOCOL`.
pub fn decode(payload: &[u8], hint: pb::Protocol) -> Result<ObservedSocket, DiagError> {
    let header =
        InetResponseHeader::parse(payload).map_err(|e| DiagError::Decode(e.to_string()))?;
    let mut protocol = hint;
    let mut tcp = None;
    let attrs = payload.get(header.buffer_len()..).unwrap_or_default();
    for nla in NlasIterator::new(attrs) {
        let nla = nla.map_err(|e| DiagError::Decode(e.to_string()))?;
        match nla.kind() {
            INET_DIAG_INFO => tcp = tcp_counters(nla.value()),
            INET_DIAG_PROTOCOL => match nla.value().first() {
                Some(&IPPROTO_TCP) => protocol = pb::Protocol::Tcp,
                Some(&IPPROTO_UDP) => protocol = pb::Protocol::Udp,
                _ => {}
            },
            _ => {}
        }
    }
    let id = &header.socket_id;
    Ok(ObservedSocket {
        protocol,
        state: header.state,
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: SocketAddr::new(id.destination_address, id.destination_port),
        inode: header.inode,
        cookie: u64::from_ne_bytes(id.cookie),
        tcp: if protocol == pb::Protocol::Tcp {
            tcp
        } else {
            None
        },
    })
}

/// The counters used from `tcp_info`: through the crate's decoder, else (a kernel older than
/// 5.4, whose structure is shorter) from the fixed offsets; `None` before Linux 4.6.
pub fn tcp_counters(value: &[u8]) -> Option<TcpCounters> {
    if let Ok(info) = TcpInfo::parse(value) {
        return Some(TcpCounters {
            bytes_acked: info.bytes_acked,
            bytes_received: info.bytes_received,
            min_rtt_us: info.min_rtt,
            srtt_us: info.rtt,
        });
    }
    let u32_at = |o: usize| {
        value
            .get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    let u64_at = |o: usize| {
        value
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    Some(TcpCounters {
        bytes_acked: u64_at(TCPI_BYTES_ACKED)?,
        bytes_received: u64_at(TCPI_BYTES_RECEIVED)?,
        min_rtt_us: u32_at(TCPI_MIN_RTT)?,
        srtt_us: u32_at(TCPI_RTT)?,
    })
}

/// The request for one socket by its addresses, ports and cookie (any state), with its
/// `tcp_info` when `info` and the socket is TCP.
fn exact_request(s: &ObservedSocket, info: bool) -> InetRequest {
    let tcp = s.protocol == pb::Protocol::Tcp;
    InetRequest {
        family: if s.local.is_ipv6() { AF_INET6 } else { AF_INET },
        protocol: if tcp { IPPROTO_TCP } else { IPPROTO_UDP },
        extensions: if info && tcp {
            ExtensionFlags::INFO
        } else {
            ExtensionFlags::empty()
        },
        states: StateFlags::all(),
        socket_id: SocketId {
            source_port: s.local.port(),
            destination_port: s.remote.port(),
            source_address: s.local.ip(),
            destination_address: s.remote.ip(),
            interface_id: 0,
            cookie: s.cookie.to_ne_bytes(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_tcp_info_from_an_old_kernel_is_read_at_fixed_offsets() {
        // 4.18's tcp_info ends after tcpi_delivered_ce (offset 192 + 8): shorter than the crate's.
        let mut v = vec![0u8; 200];
        v[TCPI_RTT..TCPI_RTT + 4].copy_from_slice(&250u32.to_ne_bytes());
        v[TCPI_BYTES_ACKED..TCPI_BYTES_ACKED + 8].copy_from_slice(&1_000_001u64.to_ne_bytes());
        v[TCPI_BYTES_RECEIVED..TCPI_BYTES_RECEIVED + 8].copy_from_slice(&42u64.to_ne_bytes());
        v[TCPI_MIN_RTT..TCPI_MIN_RTT + 4].copy_from_slice(&90u32.to_ne_bytes());
        assert!(
            TcpInfo::parse(&v).is_err(),
            "the crate wants the 5.4+ layout"
        );
        let c = tcp_counters(&v).unwrap();
        assert_eq!(
            (c.bytes_acked, c.bytes_received, c.min_rtt_us, c.srtt_us),
            (1_000_001, 42, 90, 250)
        );
        assert_eq!(tcp_counters(&v[..100]), None, "no counters before 4.6");
    }

    #[test]
    fn a_dump_of_this_network_namespace_sees_a_listener_of_this_test() {
        let Ok(mut d) = Dumper::open() else {
            eprintln!("SKIP: NETLINK_SOCK_DIAG refused on this machine");
            return;
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut out = vec![];
        d.dump_all(&mut out).unwrap();
        let me = out
            .iter()
            .find(|s| s.local.port() == port && s.protocol == pb::Protocol::Tcp)
            .expect("our listener is in the dump");
        assert_eq!(me.state, netlink_packet_sock_diag::constants::TCP_LISTEN);
        assert_ne!(me.inode, 0);
        assert_ne!(me.cookie, 0);
    }

    #[test]
    fn a_socket_is_still_open_until_its_process_closes_it() {
        let Ok(mut d) = Dumper::open() else {
            eprintln!("SKIP: NETLINK_SOCK_DIAG refused on this machine");
            return;
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let mut out = vec![];
        d.dump(AF_INET, IPPROTO_TCP, &mut out).unwrap();
        let mine = out
            .iter()
            .find(|s| s.local == c.local_addr().unwrap())
            .cloned()
            .expect("the client end is in the dump");
        assert!(d.still_open(&mine), "open: {mine:?}");
        drop(c);
        assert!(!d.still_open(&mine), "closed by its process");
        let mut other = mine.clone();
        other.cookie ^= 1;
        assert!(!d.still_open(&other), "another socket's cookie");
        drop(a);
    }

    #[test]
    fn exact_lookups_in_batches_give_fresh_counters_and_tell_the_gone_ones() {
        let Ok(mut d) = Dumper::open() else {
            eprintln!("SKIP: NETLINK_SOCK_DIAG refused on this machine");
            return;
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        // More connections than one batch, so that several batches are sent.
        let mut held = Vec::new();
        for _ in 0..LOOKUP_BATCH + 5 {
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (a, _) = l.accept().unwrap();
            held.push((c, a));
        }
        let mut out = vec![];
        d.dump(AF_INET, IPPROTO_TCP, &mut out).unwrap();
        let clients: Vec<ObservedSocket> = out
            .iter()
            .filter(|s| s.remote.port() == port)
            .filter(|s| held.iter().any(|(c, _)| c.local_addr().unwrap() == s.local))
            .cloned()
            .collect();
        assert_eq!(clients.len(), held.len(), "{out:?}");
        // Bytes over the first one, and the last one closed on both ends.
        std::io::Write::write_all(&mut held[0].0, &[7u8; 5000]).unwrap();
        let mut buf = [0u8; 5000];
        std::io::Read::read_exact(&mut held[0].1, &mut buf).unwrap();
        let last = held.pop().unwrap();
        let closed = last.0.local_addr().unwrap();
        drop(last);
        let (mut found, mut gone) = (vec![], vec![]);
        d.lookup_many(&clients, &mut found, &mut gone).unwrap();
        assert_eq!(found.len() + gone.len(), clients.len());
        let first = held[0].0.local_addr().unwrap();
        let f = found.iter().find(|s| s.local == first).expect("found");
        let before = clients.iter().find(|s| s.local == first).unwrap();
        assert_eq!(
            f.tcp.unwrap().bytes_acked,
            before.tcp.unwrap().bytes_acked + 5000,
            "fresh counters"
        );
        assert_eq!((f.cookie, f.inode), (before.cookie, before.inode));
        assert!(
            gone.iter().any(|s| s.local == closed)
                || found.iter().any(|s| s.local == closed && s.inode == 0),
            "the closed one is gone or orphaned: {gone:?}"
        );
        assert!(found.iter().all(|s| s.tcp.is_some()), "{found:?}");
    }

    #[test]
    fn one_tcp_dump_of_both_families_equals_the_two_family_dumps() {
        let Ok(mut d) = Dumper::open() else {
            eprintln!("SKIP: NETLINK_SOCK_DIAG refused on this machine");
            return;
        };
        // A connection over each family, with bytes, so that tcp_info matters.
        let mut held = Vec::new();
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = std::net::TcpListener::bind(addr) else {
                continue; // no IPv6 here
            };
            let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            std::io::Write::write_all(&mut c, &[1u8; 1000]).unwrap();
            held.push((l, c, s));
        }
        let key = |s: &ObservedSocket| (s.cookie, s.local, s.remote, s.inode);
        let ours = |v: &[ObservedSocket]| -> Vec<(u64, SocketAddr, SocketAddr, u32)> {
            let mut v: Vec<_> = v
                .iter()
                .filter(|s| {
                    held.iter().any(|(l, _, _)| {
                        let p = l.local_addr().unwrap().port();
                        s.local.port() == p || s.remote.port() == p
                    })
                })
                .map(key)
                .collect();
            v.sort();
            v
        };
        let mut both = Vec::new();
        if let Err(e) = d.dump_tcp_both_families(&mut both) {
            eprintln!("SKIP: TCPDIAG_GETSOCK refused here ({e}); dump_where uses two dumps");
            return;
        }
        let mut two = Vec::new();
        d.dump(AF_INET, IPPROTO_TCP, &mut two).unwrap();
        d.dump(AF_INET6, IPPROTO_TCP, &mut two).unwrap();
        assert_eq!(ours(&both), ours(&two));
        assert_eq!(ours(&both).len(), 3 * held.len(), "listener and both ends");
        let sender = both
            .iter()
            .find(|s| {
                held.iter()
                    .any(|(_, c, _)| c.local_addr().unwrap() == s.local)
            })
            .expect("a client end");
        assert!(sender.tcp.is_some(), "tcp_info comes with it: {sender:?}");
        assert_eq!(
            d.both_families, None,
            "dump_tcp_both_families alone does not decide"
        );
        let mut via = Vec::new();
        d.dump_all(&mut via).unwrap();
        assert_eq!(d.both_families, Some(true));
        assert_eq!(ours(&via), ours(&both));
    }
}
