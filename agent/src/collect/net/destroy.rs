//! sock_diag destroy notifications: one `NETLINK_SOCK_DIAG` socket per observed network
//! namespace, each joined to the multicast groups `SKNLGRP_INET_TCP_DESTROY`,
//! `SKNLGRP_INET_UDP_DESTROY`, `SKNLGRP_INET6_TCP_DESTROY` and `SKNLGRP_INET6_UDP_DESTROY`, all
//! read by one dedicated thread.
//!
//! When a user socket of a network namespace is freed, the kernel (Linux 4.5+,
//! `sock_diag_broadcast_destroy`) multicasts one `SOCK_DIAG_BY_FAMILY` message with the socket's
//! final `inet_diag_msg`, `INET_DIAG_PROTOCOL` and, for TCP, its final `tcp_info`, to the
//! listeners **of that namespace only**: a namespace is heard through a socket opened inside it
//! ([`open_socket`], called in the namespace; see [`super::netns`]). The message carries the
//! socket cookie (the same one the dumps report) but **no inode and no uid**
//! (`inet_diag_handler_get_info` leaves them 0): the owner is known only when the socket was seen
//! in an earlier dump.
//!
//! The thread sleeps in `poll(2)` on every socket and on a wake-up pair, so a quiet node costs no
//! wake-up at all; adding or removing a namespace's socket, or stopping, wakes it.
//!
//! The kernel lets unprivileged processes join these groups (`NL_CFG_F_NONROOT_RECV`), so the
//! subscription normally succeeds; it fails where netlink is filtered (seccomp, LSM) or the
//! kernel lacks the groups. What can still be lost:
//! - **overrun**: when a receive buffer is full the kernel drops messages and the next `recv`
//!   fails with `ENOBUFS`; each such report is counted in [`DestroyStats::overruns`] (an unknown
//!   number of events were lost). The buffer is asked for [`DESTROY_RCVBUF`] (capped by
//!   `net.core.rmem_max`);
//! - **queue full**: the thread hands decoded events to the collector over a bounded queue of
//!   [`DESTROY_QUEUE`] events; an event that does not fit is dropped and counted in
//!   [`DestroyStats::queue_full`];
//! - **kernel allocation failure**: `sock_diag_broadcast_destroy` silently skips the message when
//!   its `GFP_ATOMIC` allocation fails (not countable from user space).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use netlink_packet_core::NetlinkBuffer;
use netlink_packet_sock_diag::constants::SOCK_DIAG_BY_FAMILY;
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
use rustix::event::{PollFd, PollFlags};
use sov_proto::pb;

use super::ObservedSocket;
use super::diag::{DiagError, decode};

/// `SKNLGRP_INET_TCP_DESTROY` (`enum sknetlink_groups` in `linux/sock_diag.h`).
pub const SKNLGRP_INET_TCP_DESTROY: u32 = 1;
/// `SKNLGRP_INET_UDP_DESTROY`.
pub const SKNLGRP_INET_UDP_DESTROY: u32 = 2;
/// `SKNLGRP_INET6_TCP_DESTROY`.
pub const SKNLGRP_INET6_TCP_DESTROY: u32 = 3;
/// `SKNLGRP_INET6_UDP_DESTROY`.
pub const SKNLGRP_INET6_UDP_DESTROY: u32 = 4;
/// Receive buffer asked for (the kernel doubles it, capped by `net.core.rmem_max`).
pub const DESTROY_RCVBUF: i32 = 8 * 1024 * 1024;
/// Decoded events waiting for the collector at most (all namespaces together).
pub const DESTROY_QUEUE: usize = 65_536;
/// Datagrams read from one socket before the others get their turn.
const BURST: usize = 64;
/// Datagrams one [`DestroyListener::flush`] reads from one socket at most.
pub const FLUSH_MAX: usize = 4096;
/// `ENOBUFS` on Linux.
const ENOBUFS: i32 = 105;
/// One datagram holds one destroy message (~330 bytes); room for a few.
const RECV_BUFFER: usize = 16 * 1024;

/// What the listener thread counted since it started.
#[derive(Debug, Default)]
pub struct DestroyStats {
    /// Destroy messages received and decoded.
    pub events: AtomicU64,
    /// `ENOBUFS` reports: the kernel dropped an unknown number of messages each time.
    pub overruns: AtomicU64,
    /// Decoded events dropped because the queue to the collector was full.
    pub queue_full: AtomicU64,
    /// Messages that could not be decoded.
    pub decode_errors: AtomicU64,
}

/// A destroy-event socket of the namespace the calling thread is in: opened, bound, joined to
/// the four groups, non-blocking.
pub fn open_socket() -> Result<Socket, DiagError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(DiagError::Open)?;
    socket.bind_auto().map_err(DiagError::Open)?;
    for group in [
        SKNLGRP_INET_TCP_DESTROY,
        SKNLGRP_INET_UDP_DESTROY,
        SKNLGRP_INET6_TCP_DESTROY,
        SKNLGRP_INET6_UDP_DESTROY,
    ] {
        socket
            .add_membership(group)
            .map_err(|source| DiagError::Join { group, source })?;
    }
    if let Err(e) = socket.set_rx_buf_sz(DESTROY_RCVBUF) {
        tracing::debug!(error = %e, "cannot enlarge the destroy-event receive buffer");
    }
    socket.set_non_blocking(true).map_err(DiagError::Open)?;
    Ok(socket)
}

/// The sockets the thread reads, by namespace key, and a version that changes with them.
#[derive(Debug, Default)]
struct Registry {
    sockets: HashMap<u64, Arc<Socket>>,
    version: u64,
}

/// State shared with the thread.
#[derive(Debug)]
struct Shared {
    registry: Mutex<Registry>,
    queue: Mutex<VecDeque<(u64, ObservedSocket)>>,
    /// The receive buffer, held by whoever reads the sockets (the thread, or a flush): once a
    /// flush holds it, every event received so far is in `queue`.
    reading: Mutex<Vec<u8>>,
    stop: AtomicBool,
    stats: DestroyStats,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The running listener: the sockets of every observed namespace, the queue of destroyed
/// sockets (each tagged with its namespace key) and the thread that fills it. Dropping it stops
/// the thread and closes every socket.
#[derive(Debug)]
pub struct DestroyListener {
    shared: Arc<Shared>,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl DestroyListener {
    /// Start the thread, listening to the calling thread's namespace under key `key`.
    pub fn start(key: u64) -> Result<Self, DiagError> {
        let socket = open_socket()?;
        let (wake, woken) = UnixStream::pair().map_err(DiagError::Open)?;
        woken.set_nonblocking(true).map_err(DiagError::Open)?;
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::default()),
            queue: Mutex::new(VecDeque::new()),
            reading: Mutex::new(vec![0u8; RECV_BUFFER]),
            stop: AtomicBool::new(false),
            stats: DestroyStats::default(),
        });
        lock(&shared.registry).sockets.insert(key, Arc::new(socket));
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sov-net-destroy".into())
            .spawn(move || listen(&sh, woken))
            .map_err(DiagError::Io)?;
        Ok(Self {
            shared,
            wake,
            thread: Some(thread),
        })
    }

    fn poke(&self) {
        // A full pair (the thread is already due to wake) is fine.
        let _ = (&self.wake).write(&[1]);
    }

    /// Listen to another namespace's socket (opened inside it) under `key`.
    pub fn add(&self, key: u64, socket: Socket) {
        let mut r = lock(&self.shared.registry);
        r.sockets.insert(key, Arc::new(socket));
        r.version += 1;
        drop(r);
        self.poke();
    }

    /// Stop listening to `key`'s namespace; its socket is closed once the thread lets go of it
    /// (at its next wake-up, which this causes).
    pub fn remove(&self, key: u64) {
        let mut r = lock(&self.shared.registry);
        if r.sockets.remove(&key).is_some() {
            r.version += 1;
        }
        drop(r);
        self.poke();
    }

    /// Namespaces listened to.
    pub fn namespaces(&self) -> usize {
        lock(&self.shared.registry).sockets.len()
    }

    /// Move every event received so far into `out`.
    pub fn drain(&self, out: &mut Vec<(u64, ObservedSocket)>) {
        let mut q = lock(&self.shared.queue);
        out.extend(q.drain(..));
        if q.capacity() > 1024 {
            q.shrink_to(1024);
        }
    }

    /// Read, on the caller's thread, every event already queued by the kernel on the sockets of
    /// the namespaces `keys` (all of them when `None`) into the queue that
    /// [`DestroyListener::drain`] empties: after it, every event the kernel had delivered before
    /// the call is in the queue (an event the listener thread was decoding is there too: both
    /// read under one lock). False when a socket still had events after [`FLUSH_MAX`] messages
    /// (the caller then knows it may have missed some).
    pub fn flush(&self, keys: Option<&[u64]>) -> bool {
        let sockets: Vec<(u64, Arc<Socket>)> = {
            let r = lock(&self.shared.registry);
            r.sockets
                .iter()
                .filter(|(k, _)| keys.is_none_or(|ks| ks.contains(k)))
                .map(|(k, s)| (*k, s.clone()))
                .collect()
        };
        let mut buf = lock(&self.shared.reading);
        let mut complete = true;
        for (key, socket) in &sockets {
            let mut drained = false;
            for _ in 0..FLUSH_MAX / BURST {
                if read_burst(*key, socket, &mut buf[..], &self.shared) {
                    drained = true;
                    break;
                }
            }
            complete &= drained;
        }
        complete
    }

    /// The thread's counters.
    pub fn stats(&self) -> &DestroyStats {
        &self.shared.stats
    }
}

impl Drop for DestroyListener {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn listen(shared: &Shared, mut woken: UnixStream) {
    let mut version = u64::MAX;
    let mut sockets: Vec<(u64, Arc<Socket>)> = Vec::new();
    let mut drained = [0u8; 64];
    while !shared.stop.load(Ordering::Relaxed) {
        {
            let r = lock(&shared.registry);
            if r.version != version {
                version = r.version;
                sockets = r.sockets.iter().map(|(k, s)| (*k, s.clone())).collect();
            }
        }
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(sockets.len() + 1);
        fds.push(PollFd::new(&woken, PollFlags::IN));
        for (_, s) in &sockets {
            fds.push(PollFd::new(s.as_ref(), PollFlags::IN));
        }
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "poll on destroy-event sockets failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        if ready[0] {
            while matches!(woken.read(&mut drained), Ok(n) if n > 0) {}
        }
        let mut buf = lock(&shared.reading);
        for ((key, socket), _) in sockets.iter().zip(&ready[1..]).filter(|(_, r)| **r) {
            read_burst(*key, socket, &mut buf[..], shared);
        }
    }
}

/// Read up to [`BURST`] datagrams from one socket into the queue; true when it has no more
/// (or failed), false when the burst ended with more possibly waiting.
fn read_burst(key: u64, socket: &Socket, buf: &mut [u8], shared: &Shared) -> bool {
    let stats = &shared.stats;
    for _ in 0..BURST {
        let n = match socket.recv(&mut &mut buf[..], 0) {
            Ok(n) => n.min(buf.len()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.raw_os_error() == Some(ENOBUFS) => {
                stats.overruns.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, netns = key, "destroy-event socket failed");
                return true;
            }
        };
        let mut off = 0;
        while off < n {
            let Ok(msg) = NetlinkBuffer::new_checked(&buf[off..n]) else {
                stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                break;
            };
            let len = msg.length() as usize;
            if len == 0 {
                break;
            }
            off += len.div_ceil(4) * 4;
            if msg.message_type() != SOCK_DIAG_BY_FAMILY {
                continue;
            }
            match decode(msg.payload(), pb::Protocol::Unspecified) {
                Ok(s) => {
                    stats.events.fetch_add(1, Ordering::Relaxed);
                    let mut q = lock(&shared.queue);
                    if q.len() < DESTROY_QUEUE {
                        q.push_back((key, s));
                    } else {
                        stats.queue_full.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => {
                    stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    false
}
