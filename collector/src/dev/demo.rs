//! `sov-collector dev --demo`: a clearly labelled demonstration of what Sovereign is for, made
//! of real parts on this host only.
//!
//! - **A destination abroad**: a TCP endpoint on the loopback address [`DEMO_ABROAD_IP`], which
//!   a `[[geo.override]]` places in another country ([`demo_foreign_country`]), labelled as
//!   the demo's in its organisation;
//! - **restricted weights**: a small safetensors file in a Hugging Face cache layout under the
//!   data directory (`sovereign-demo/restricted-model`, restricted by the dev policy);
//! - **a process that holds them and sends abroad**: this binary's hidden `demo-sender`
//!   command, started as a child process from a copy of this executable
//!   ([`sender_executable`]): it keeps the weight file open and sends its bytes
//!   to the endpoint, about [`SEND_BYTES_PER_SEC`] a second, until its standard input closes
//!   (the dev process holds the other end, so the sender ends with it);
//! - **an alert receiver**: a local HTTP endpoint configured as a webhook sink, which prints
//!   every alert it receives.
//!
//! The agent observes the sender as it would any process (sock_diag, `/proc/<pid>/fd`); the
//! rules open a `foreign-egress` and a `weights-exfiltration` breach and the alert reaches the
//! receiver, usually within a minute. Nothing here fakes an observation.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Loopback address of the demo's destination "abroad" (the whole of 127.0.0.0/8 is local).
pub const DEMO_ABROAD_IP: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);
/// Organisation the override gives the demo destination, so no one takes it for real.
pub const DEMO_ORG: &str = "DEMO: a loopback endpoint placed abroad by sov-collector dev --demo";
/// Publisher of the demo model (restricted by the dev policy).
pub const DEMO_ORG_ID: &str = "sovereign-demo";
/// Name of the demo model.
pub const DEMO_MODEL: &str = "restricted-model";
/// Size of the demo weight file's tensor data, bytes.
pub const DEMO_WEIGHT_BYTES: usize = 4 * 1024 * 1024;
/// Bytes the sender sends each second.
pub const SEND_BYTES_PER_SEC: usize = 1024 * 1024;
/// Largest alert body the receiver reads.
const MAX_ALERT_BYTES: usize = 256 * 1024;

/// The country the demo places its destination in: abroad from `home`.
pub fn demo_foreign_country(home: &str) -> &'static str {
    if home == "US" { "FR" } else { "US" }
}

/// Write the demo's weight file (a valid safetensors file, one F32 tensor) in a Hugging Face
/// cache layout under `hub`, unless it is there already; its path.
pub fn write_weights(hub: &Path) -> std::io::Result<PathBuf> {
    let repo = hub.join(format!("models--{DEMO_ORG_ID}--{DEMO_MODEL}"));
    let rev = "0000000000000000000000000000000000000d3e";
    let snap = repo.join("snapshots").join(rev);
    let file = snap.join("model.safetensors");
    if file.exists() {
        return Ok(file);
    }
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::create_dir_all(&snap)?;
    std::fs::write(repo.join("refs/main"), rev)?;
    let elements = DEMO_WEIGHT_BYTES / 4;
    let mut header = format!(
        r#"{{"__metadata__":{{"demo":"sov-collector dev --demo"}},"weight":{{"dtype":"F32","shape":[{elements}],"data_offsets":[0,{DEMO_WEIGHT_BYTES}]}}}}"#
    );
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut bytes = Vec::with_capacity(8 + header.len() + DEMO_WEIGHT_BYTES);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    // Deterministic, not compressible to nothing: a small linear congruential sequence.
    let mut x: u32 = 0x5eed_1234;
    for _ in 0..elements {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let v = f32::from(u16::try_from(x >> 16).unwrap_or(0)) / 65_536.0 - 0.5;
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let tmp = snap.join(".model.safetensors.tmp");
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, &file)?;
    Ok(file)
}

/// The demo's destination: accepts connections on `listener` and reads everything sent.
pub async fn endpoint(listener: TcpListener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        let Ok((mut stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = tokio::select! {
                    n = tokio::io::AsyncReadExt::read(&mut stream, &mut buf) => n,
                    () = stop.cancelled() => return,
                };
                if !matches!(n, Ok(n) if n > 0) {
                    return;
                }
            }
        });
    }
}

/// The line the receiver prints for one alert body.
pub fn alert_line(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_owned();
    format!(
        "[demo alert receiver] alert: {} {} ({}) on node {}: {} (breach {}, log seq {})",
        s("rule"),
        s("state"),
        s("severity"),
        s("node"),
        s("subject"),
        s("breach_id"),
        v.get("seq").and_then(|x| x.as_u64()).unwrap_or(0)
    )
}

/// The demo's alert receiver: an HTTP endpoint that prints every alert POSTed to it.
pub async fn receiver(listener: TcpListener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = Limited::new(req.into_body(), MAX_ALERT_BYTES)
                        .collect()
                        .await;
                    let status = match body {
                        Ok(b) => {
                            println!("{}", alert_line(&b.to_bytes()));
                            hyper::StatusCode::OK
                        }
                        Err(_) => hyper::StatusCode::PAYLOAD_TOO_LARGE,
                    };
                    let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                    *resp.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(resp)
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_secs(60), conn) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// The executable the sender runs from: a copy of this one in `dir` (made again when this
/// one changed). The agent never lists processes of its own executable as users of a weight
/// file (a `sov-agent scan` beside the agent is not a user), and the dev mode's agent runs in
/// this executable: a sender started from it would hold the weights unseen.
pub fn sender_executable(dir: &Path) -> std::io::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let copy = dir.join("sov-demo-sender");
    let fresh = |p: &Path| std::fs::metadata(p).and_then(|m| Ok((m.len(), m.modified()?)));
    let (len, modified) = fresh(&me)?;
    let current = fresh(&copy).is_ok_and(|(l, m)| l == len && m >= modified);
    if !current {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(".sov-demo-sender.tmp");
        std::fs::copy(&me, &tmp)?;
        std::fs::rename(&tmp, &copy)?;
    }
    Ok(copy)
}

/// The sender process, killed and reaped when dropped (also when the dev mode fails).
#[derive(Debug)]
pub struct SenderChild(pub std::process::Child);

impl Drop for SenderChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bind the demo's destination on [`DEMO_ABROAD_IP`] (any free port).
pub async fn bind_endpoint() -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::new(IpAddr::V4(DEMO_ABROAD_IP), 0)).await
}

/// The hidden `demo-sender` command: hold `weights` open and send its bytes to `to`, about
/// [`SEND_BYTES_PER_SEC`] a second, until standard input closes (the dev process ended).
pub fn sender(weights: &Path, to: SocketAddr) -> std::io::Result<()> {
    let mut file = std::fs::File::open(weights)?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    // `file` stays open for as long as this process runs: the agent sees the weights held.
    let parent_gone = Arc::new(AtomicBool::new(false));
    {
        let gone = parent_gone.clone();
        std::thread::spawn(move || {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            gone.store(true, Ordering::SeqCst);
        });
    }
    let chunk = SEND_BYTES_PER_SEC / 4;
    let mut offset = 0usize;
    while !parent_gone.load(Ordering::SeqCst) {
        let mut stream = match std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(s) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        // One connection for a while, then a new one (short and long flows both appear).
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until && !parent_gone.load(Ordering::SeqCst) {
            let end = (offset + chunk).min(data.len());
            if stream.write_all(&data[offset..end]).is_err() {
                break;
            }
            offset = if end >= data.len() { 0 } else { end };
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    drop(file);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_demo_weight_file_is_a_valid_safetensors_file_in_a_cache_layout() {
        let dir = tempfile::tempdir().unwrap();
        let file = write_weights(dir.path()).unwrap();
        assert!(
            file.to_string_lossy()
                .contains("models--sovereign-demo--restricted-model/snapshots/")
        );
        let bytes = std::fs::read(&file).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        assert_eq!(header["weight"]["dtype"], "F32");
        assert_eq!(bytes.len(), 8 + n + DEMO_WEIGHT_BYTES);
        // A second start reuses it.
        assert_eq!(write_weights(dir.path()).unwrap(), file);
    }

    #[test]
    fn the_demo_destination_is_abroad_from_any_home() {
        assert_eq!(demo_foreign_country("MA"), "US");
        assert_eq!(demo_foreign_country("US"), "FR");
    }

    #[test]
    fn an_alert_line_names_rule_state_node_and_subject() {
        let line = alert_line(
            br#"{"seq":3,"breach_id":"b1","rule":"foreign-egress","state":"open","severity":"critical","node":"n","subject":"country:US"}"#,
        );
        assert!(
            line.contains("alert: foreign-egress open (critical) on node n: country:US"),
            "{line}"
        );
    }
}
