//! sock_diag destroy notifications: a `NETLINK_SOCK_DIAG` socket joined to the multicast groups
//! `SKNLGRP_INET_TCP_DESTROY`, `SKNLGRP_INET_UDP_DESTROY`, `SKNLGRP_INET6_TCP_DESTROY` and
//! `SKNLGRP_INET6_UDP_DESTROY`, read on a dedicated thread.
//!
//! When a user socket of this network namespace is freed, the kernel (Linux 4.5+,
//! `sock_diag_broadcast_destroy`) multicasts one `SOCK_DIAG_BY_FAMILY` message with the socket's
//! final `inet_diag_msg`, `INET_DIAG_PROTOCOL` and, for TCP, its final `tcp_info`. That message
//! carries the socket cookie (the same one the dumps report) but **no inode and no uid**
//! (`inet_diag_handler_get_info` leaves them 0): the owner is known only when the socket was seen
//! in an earlier dump.
//!
//! The kernel lets unprivileged processes join these groups (`NL_CFG_F_NONROOT_RECV`), so the
//! subscription normally succeeds; it fails where netlink is filtered (seccomp, LSM) or the
//! kernel lacks the groups. What can still be lost:
//! - **overrun**: when the receive buffer is full the kernel drops messages and the next `recv`
//!   fails with `ENOBUFS`; each such report is counted in [`DestroyStats::overruns`] (an unknown
//!   number of events were lost). The buffer is asked for [`DESTROY_RCVBUF`] (capped by
//!   `net.core.rmem_max`) and the thread reads continuously, sleeping [`POLL_IDLE`] only when the
//!   socket is empty;
//! - **queue full**: the thread hands decoded events to the collector over a bounded queue of
//!   [`DESTROY_QUEUE`] events; an event that does not fit is dropped and counted in
//!   [`DestroyStats::queue_full`];
//! - **kernel allocation failure**: `sock_diag_broadcast_destroy` silently skips the message when
//!   its `GFP_ATOMIC` allocation fails (not countable from user space).

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use netlink_packet_core::NetlinkBuffer;
use netlink_packet_sock_diag::constants::SOCK_DIAG_BY_FAMILY;
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
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
/// Decoded events waiting for the collector at most.
pub const DESTROY_QUEUE: usize = 65_536;
/// Sleep of the listener thread when the socket has nothing to read.
pub const POLL_IDLE: Duration = Duration::from_millis(10);
/// Longest sleep when the socket stays idle: the sleep doubles from [`POLL_IDLE`] up to this
/// while nothing arrives and drops back at the first event, so a quiet node wakes the thread
/// 10 times a second instead of 100 (measured: 1.5 ms CPU per second at a fixed 10 ms). The
/// kernel holds what arrives meanwhile in the receive buffer ([`DESTROY_RCVBUF`]).
pub const POLL_IDLE_MAX: Duration = Duration::from_millis(100);
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

/// The running listener: the queue of destroyed sockets and the thread that fills it. Dropping
/// it stops the thread (within [`POLL_IDLE_MAX`]).
#[derive(Debug)]
pub struct DestroyListener {
    queue: Arc<Mutex<VecDeque<ObservedSocket>>>,
    stop: Arc<AtomicBool>,
    stats: Arc<DestroyStats>,
    thread: Option<JoinHandle<()>>,
}

impl DestroyListener {
    /// Open the socket, join the four groups and start the thread.
    pub fn start() -> Result<Self, DiagError> {
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
        // A queue that grows with the burst and is bounded by DESTROY_QUEUE (a preallocated
        // channel of that size would hold about 8 MB for nothing on a quiet node).
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let tx = queue.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(DestroyStats::default());
        let (s, st) = (stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("sov-net-destroy".into())
            .spawn(move || listen(&socket, &tx, &s, &st))
            .map_err(DiagError::Io)?;
        Ok(Self {
            queue,
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// Move every event received so far into `out`.
    pub fn drain(&self, out: &mut Vec<ObservedSocket>) {
        let mut q = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        out.extend(q.drain(..));
        if q.capacity() > 1024 {
            q.shrink_to(1024);
        }
    }

    /// The thread's counters.
    pub fn stats(&self) -> &DestroyStats {
        &self.stats
    }
}

impl Drop for DestroyListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn listen(
    socket: &Socket,
    tx: &Mutex<VecDeque<ObservedSocket>>,
    stop: &AtomicBool,
    stats: &DestroyStats,
) {
    let mut buf = vec![0u8; RECV_BUFFER];
    let mut idle = POLL_IDLE;
    while !stop.load(Ordering::Relaxed) {
        let n = match socket.recv(&mut &mut buf[..], 0) {
            Ok(n) => {
                idle = POLL_IDLE;
                n.min(buf.len())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(idle);
                idle = (idle * 2).min(POLL_IDLE_MAX);
                continue;
            }
            Err(e) if e.raw_os_error() == Some(ENOBUFS) => {
                stats.overruns.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "destroy-event socket failed; retrying");
                std::thread::sleep(POLL_IDLE * 10);
                continue;
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
                    let mut q = tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if q.len() < DESTROY_QUEUE {
                        q.push_back(s);
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
}
