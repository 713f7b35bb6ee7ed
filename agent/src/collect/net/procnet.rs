//! The fallback when sock_diag netlink is refused: `/proc/net/tcp`, `tcp6`, `udp` and `udp6`.
//!
//! These tables give the endpoints, the state and the inode of every socket of the reader's
//! network namespace, but no byte counters and no RTT: flows built from them have
//! `bytes_known = false`. Addresses are printed as the kernel's in-memory words in host byte
//! order (`%08X` of a `__be32`), so they are turned back into bytes with `to_ne_bytes`.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use sov_proto::pb;

use super::ObservedSocket;

/// The tables read, relative to the proc root: (file, protocol, IPv6).
pub const TABLES: [(&str, pb::Protocol, bool); 4] = [
    ("net/tcp", pb::Protocol::Tcp, false),
    ("net/tcp6", pb::Protocol::Tcp, true),
    ("net/udp", pb::Protocol::Udp, false),
    ("net/udp6", pb::Protocol::Udp, true),
];
/// `st` of a time-wait socket (no owner, no inode).
const TCP_TIME_WAIT: u8 = 6;

/// Read the four tables under `proc_root`. A missing IPv6 table (IPv6 disabled) is not an error;
/// a missing `net/tcp` is. Returns the sockets and the number of lines that did not parse.
pub fn read_all(proc_root: &Path) -> io::Result<(Vec<ObservedSocket>, usize)> {
    let mut out = Vec::new();
    let mut bad = 0;
    for (file, protocol, v6) in TABLES {
        match fs::read_to_string(proc_root.join(file)) {
            Ok(text) => bad += parse(&text, protocol, v6, &mut out),
            Err(e) if v6 || protocol == pb::Protocol::Udp => {
                tracing::debug!(error = %e, file, "socket table not readable");
            }
            Err(e) => return Err(e),
        }
    }
    Ok((out, bad))
}

/// Parse one table (the header line is skipped) into `out`; time-wait sockets are left out.
/// Returns the number of lines that did not parse.
pub fn parse(text: &str, protocol: pb::Protocol, v6: bool, out: &mut Vec<ObservedSocket>) -> usize {
    let mut bad = 0;
    for line in text.lines().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line, protocol, v6) {
            Some(s) if protocol == pb::Protocol::Tcp && s.state == TCP_TIME_WAIT => {}
            Some(s) => out.push(s),
            None => bad += 1,
        }
    }
    bad
}

fn parse_line(line: &str, protocol: pb::Protocol, v6: bool) -> Option<ObservedSocket> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let local = parse_endpoint(f.get(1)?, v6)?;
    let remote = parse_endpoint(f.get(2)?, v6)?;
    let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
    let inode = f.get(9)?.parse().ok()?;
    Some(ObservedSocket {
        protocol,
        state,
        local,
        remote,
        inode,
        cookie: 0,
        tcp: None,
    })
}

/// `0100007F:1F90` → 127.0.0.1:8080 (on a little-endian host); 32 hex digits for IPv6.
pub fn parse_endpoint(s: &str, v6: bool) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
            let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        if addr.len() != 8 {
            return None;
        }
        IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(addr, 16).ok()?.to_ne_bytes(),
        ))
    };
    Some(SocketAddr::new(ip, port))
}

// The fixtures below are what a little-endian machine prints.
#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:6448 00000000:0000 0A 00000000:00000000 00:00000000 00000000   106        0 7455 1 000000006906e01a 100 0 0 10 0
   1: 0F02000A:C35A 2328A8C0:01BB 01 00000000:00000000 02:000A7B6B 00000000  1000        0 912345 2 00000000a78aaa88 20 4 30 10 -1
   2: 0F02000A:C35B 2328A8C0:01BB 06 00000000:00000000 03:00001770 00000000     0        0 0 3 00000000a78aaa89
   3: garbage
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5057 1 00000000bfd5c2b1 100 0 0 10 0
   1: 0000000000000000FFFF00000F02000A:D431 0000000000000000FFFF00002328A8C0:01BB 01 00000000:00000000 00:00000000 00000000  1000        0 777 1 00000000bfd5c2b2 20 4 30 10 -1
   2: B80D0120000000000000000001000000:E1F2 0048042A085B0103000000000E200000:01BB 01 00000000:00000000 00:00000000 00000000  1000        0 778 1 00000000bfd5c2b3 20 4 30 10 -1
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  123: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 1991 2 0000000000000000 0
  456: 0F02000A:9C41 08080808:0035 01 00000000:00000000 00:00000000 00000000  1000        0 2992 2 0000000000000000 0
";

    #[test]
    fn ipv4_lines_give_endpoints_state_and_inode_and_time_wait_is_left_out() {
        let mut out = vec![];
        let bad = parse(TCP, pb::Protocol::Tcp, false, &mut out);
        assert_eq!(bad, 1, "the garbage line");
        assert_eq!(out.len(), 2, "listener and established; time-wait left out");
        assert_eq!(out[0].local, "127.0.0.1:25672".parse().unwrap());
        assert_eq!(out[0].state, 0x0A);
        assert_eq!(out[0].inode, 7455);
        assert_eq!(out[1].local, "10.0.2.15:50010".parse().unwrap());
        assert_eq!(out[1].remote, "192.168.40.35:443".parse().unwrap());
        assert_eq!(out[1].inode, 912_345);
        assert!(out[1].tcp.is_none(), "no counters in /proc/net");
    }

    #[test]
    fn ipv6_lines_give_v6_and_v4_mapped_endpoints() {
        let mut out = vec![];
        assert_eq!(parse(TCP6, pb::Protocol::Tcp, true, &mut out), 0);
        assert_eq!(out[0].local, "[::1]:8080".parse().unwrap());
        assert_eq!(out[1].remote, "[::ffff:192.168.40.35]:443".parse().unwrap());
        assert_eq!(out[2].local, "[2001:db8::1]:57842".parse().unwrap());
        assert_eq!(
            out[2].remote,
            "[2a04:4800:301:5b08::200e]:443".parse().unwrap()
        );
        assert_eq!(out[2].inode, 778);
    }

    #[test]
    fn udp_lines_give_bound_and_connected_sockets() {
        let mut out = vec![];
        assert_eq!(parse(UDP, pb::Protocol::Udp, false, &mut out), 0);
        assert_eq!(out[0].local, "127.0.0.53:53".parse().unwrap());
        assert!(out[0].remote.ip().is_unspecified());
        assert_eq!(out[1].remote, "8.8.8.8:53".parse().unwrap());
        assert_eq!(out[1].protocol, pb::Protocol::Udp);
    }

    #[test]
    fn a_proc_root_without_ipv6_tables_still_reads_ipv4() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("net")).unwrap();
        fs::write(root.path().join("net/tcp"), TCP).unwrap();
        let (socks, bad) = read_all(root.path()).unwrap();
        assert_eq!((socks.len(), bad), (2, 1));
        let empty = tempfile::tempdir().unwrap();
        assert!(
            read_all(empty.path()).is_err(),
            "no net/tcp at all is an error"
        );
    }
}
