//! Hosts of the test's own: a network namespace joined to this one by a veth pair, with
//! addresses of the test's choosing, and a sink server inside it (python3). Removed on drop.
//! Tests fall back to loopback addresses, and say so, where namespaces cannot be created.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::KillOnDrop;

/// A network namespace with a veth pair to it; removed on drop.
#[derive(Debug)]
pub struct Netns {
    /// Namespace name (for `ip netns exec`).
    pub name: String,
    host_if: String,
    /// IPv4 addresses of the far end: `10.251.N.2`, `.3`, ... (as many as asked for).
    pub v4_peers: Vec<String>,
    /// IPv6 address of the far end.
    pub v6_peer: String,
}

/// Run `ip ARGS`.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// A namespace named after this process (`tag` keeps two tests of one binary apart), with
    /// `v4_count` IPv4 addresses (at least one) and one IPv6 address at the far end.
    pub fn create(tag: u32, v4_count: u8) -> Result<Self, String> {
        let n = (std::process::id().wrapping_add(tag * 37)) % 200 + 20;
        let name = format!("sovt{}-{tag}", std::process::id());
        let host_if = format!("sovh{n}");
        let peer_if = format!("sovp{n}");
        let ns = Self {
            name: name.clone(),
            host_if: host_if.clone(),
            v4_peers: (0..v4_count.max(1))
                .map(|i| format!("10.251.{n}.{}", i + 2))
                .collect(),
            v6_peer: format!("fd00:251:{n}::2"),
        };
        ip(&["netns", "add", &name])?;
        // From here on, drop removes what was made.
        let cleanup = ns;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ])?;
        ip(&["link", "set", &peer_if, "netns", &name])?;
        ip(&["addr", "add", &format!("10.251.{n}.1/24"), "dev", &host_if])?;
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("fd00:251:{n}::1/64"),
            "dev",
            &host_if,
            "nodad",
        ])?;
        ip(&["link", "set", &host_if, "up"])?;
        for a in &cleanup.v4_peers {
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                &peer_if,
            ])?;
        }
        ip(&[
            "-n",
            &name,
            "-6",
            "addr",
            "add",
            &format!("{}/64", cleanup.v6_peer),
            "dev",
            &peer_if,
            "nodad",
        ])?;
        ip(&["-n", &name, "link", "set", &peer_if, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(cleanup)
    }
}

impl Netns {
    /// The address of this side of the veth pair (`10.251.N.1`).
    pub fn host_v4(&self) -> String {
        let mut parts: Vec<&str> = self.v4_peers[0].split('.').collect();
        parts[3] = "1";
        parts.join(".")
    }

    /// Take this side of the veth pair down (a partition: nothing passes either way, no
    /// connection is reset) or up again.
    pub fn set_link(&self, up: bool) -> Result<(), String> {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A sink server (python3) on `addr` (in namespace `netns`, or here): reads everything from
/// each connection, then answers `reply` bytes. Returns it (killed on drop) and its port.
pub fn sink(netns: Option<&str>, addr: &str, reply: usize) -> (KillOnDrop, u16) {
    let script = r#"
import socket, sys, threading
a = sys.argv[1]; r = int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ':' in a else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((a, 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
def serve(c):
    while c.recv(65536):
        pass
    c.sendall(b'y' * r); c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;
    let reply = reply.to_string();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "python3", "-c", script, addr, &reply]);
            c
        }
        None => {
            let mut c = Command::new("python3");
            c.args(["-c", script, addr, &reply]);
            c
        }
    };
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("start sink");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("sink stdout"))
        .read_line(&mut line)
        .expect("sink port");
    let port = line.trim().parse().expect("sink port number");
    (KillOnDrop(child), port)
}

/// Send `n` bytes, hold the connection open for `hold` (so that the agent samples it with its
/// owner), half-close, read the reply to the end; returns the reply length.
pub fn send(addr: SocketAddr, n: usize, hold: Duration) -> usize {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    let buf = vec![b'x'; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len());
        s.write_all(&buf[..k]).expect("send");
        left -= k;
    }
    std::thread::sleep(hold);
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("read reply");
    reply.len()
}

/// Two network namespaces joined directly by a veth pair, with no route to this one: a
/// "client" namespace (a pod) and a "server" namespace (a host abroad). Removed on drop.
#[derive(Debug)]
pub struct Linked {
    /// The client's namespace name (for `ip netns exec`).
    pub client: String,
    /// The server's namespace name.
    pub server: String,
    /// The client's address (`10.253.N.1`).
    pub client_ip: String,
    /// The server's address (`10.253.N.2`).
    pub server_ip: String,
}

impl Linked {
    /// A pair named after this process and `tag`.
    pub fn create(tag: u32) -> Result<Self, String> {
        let pid = std::process::id();
        let n = (pid.wrapping_add(tag * 53)) % 200 + 20;
        let l = Self {
            client: format!("sovlc{pid}-{tag}"),
            server: format!("sovls{pid}-{tag}"),
            client_ip: format!("10.253.{n}.1"),
            server_ip: format!("10.253.{n}.2"),
        };
        ip(&["netns", "add", &l.client])?;
        // From here on, drop removes what was made.
        let l = Dropping(l);
        ip(&["netns", "add", &l.0.server])?;
        let (a, b) = (
            format!("svc{}x{tag}", pid % 1_000_000),
            format!("svs{}x{tag}", pid % 1_000_000),
        );
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        let moved = ip(&["link", "set", &a, "netns", &l.0.client])
            .and_then(|()| ip(&["link", "set", &b, "netns", &l.0.server]));
        if let Err(e) = moved {
            let _ = ip(&["link", "del", &a]);
            return Err(e);
        }
        for (ns, dev, addr) in [
            (&l.0.client, &a, &l.0.client_ip),
            (&l.0.server, &b, &l.0.server_ip),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(l.into_inner())
    }
}

/// Removes a half-made pair when creation fails.
struct Dropping(Linked);

impl Dropping {
    fn into_inner(self) -> Linked {
        let me = std::mem::ManuallyDrop::new(self);
        // Moving out of a ManuallyDrop: the namespaces now belong to the returned value.
        Linked {
            client: me.0.client.clone(),
            server: me.0.server.clone(),
            client_ip: me.0.client_ip.clone(),
            server_ip: me.0.server_ip.clone(),
        }
    }
}

impl Drop for Dropping {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0.client]);
        let _ = ip(&["netns", "del", &self.0.server]);
    }
}

impl Drop for Linked {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and so the pair.
        let _ = ip(&["netns", "del", &self.client]);
        let _ = ip(&["netns", "del", &self.server]);
    }
}

/// A client (python3) in namespace `netns` (or here) that connects to `addr`, prints
/// `connected`, sends `n` bytes when it reads a line on stdin, prints `sent`, and closes when
/// stdin closes. The child is the python process itself (`ip netns exec` executes it).
pub struct Client {
    /// The process (killed on drop).
    pub child: KillOnDrop,
    lines: BufReader<std::process::ChildStdout>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("pid", &self.pid()).finish()
    }
}

impl Client {
    /// Start it and wait until it is connected.
    pub fn connect(netns: Option<&str>, addr: SocketAddr, n: usize) -> Self {
        let script = r#"
import socket, sys
a, p, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((a, p), timeout=10)
print("connected", flush=True)
sys.stdin.readline()
buf = b"x" * 65536
left = n
while left > 0:
    k = min(left, len(buf)); s.sendall(buf[:k]); left -= k
print("sent", flush=True)
sys.stdin.read()
s.close()
"#;
        let args = [
            "-c".to_owned(),
            script.to_owned(),
            addr.ip().to_string(),
            addr.port().to_string(),
            n.to_string(),
        ];
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "python3"]).args(&args);
                c
            }
            None => {
                let mut c = Command::new("python3");
                c.args(&args);
                c
            }
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start client");
        let stdout = child.stdout.take().expect("client stdout");
        let mut c = Self {
            child: KillOnDrop(child),
            lines: BufReader::new(stdout),
        };
        c.expect_line("connected");
        c
    }

    fn expect_line(&mut self, want: &str) {
        let mut line = String::new();
        self.lines.read_line(&mut line).expect("client output");
        assert_eq!(line.trim(), want, "client said {line:?}");
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Send the bytes and wait until they are written to the socket.
    pub fn send(&mut self) {
        let stdin = self.child.0.stdin.as_mut().expect("client stdin");
        stdin.write_all(b"go\n").expect("tell the client");
        stdin.flush().expect("flush");
        self.expect_line("sent");
    }
}
