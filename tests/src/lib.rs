//! `sov-e2e`: support for whole-system tests. Real collectors (in this process or as child
//! processes that can be killed with SIGKILL), real agents, real certificates, real mutual TLS
//! on loopback, real SQLite.
//!
//! - [`Pki`]: a CA with the collector's certificate and client certificates on demand;
//! - [`InProcessCollector`]: `sov_collector::app::run` on `127.0.0.1:0`;
//! - [`CollectorProcess`] / [`AgentProcess`]: the `e2e-collector` / `e2e-agent` binaries
//!   (thin copies of the real mains);
//! - [`agent_config`], [`list_nodes`], [`push_client`], [`eventually`], and
//!   [`while_progressing`] (a wait that fails only when the system stops moving) with
//!   [`agent_stall`] (how long an agent may go quiet, from its own settings);
//! - [`skipped`]: a skipped test says so where `.ci/run` prints it;
//! - [`https_get`]: one HTTPS request to the collector's API, with a certificate or a token;
//! - [`netns`]: hosts of the test's own in a network namespace, and a sink server there;
//! - [`receivers`]: HTTP and TCP syslog alert receivers on loopback;
//! - [`hostile`]: the parsers of outside input as fuzz targets, and a small mutator;
//! - [`training`]: Parquet files, safetensors headers and a trainer process.

pub mod hostile;
pub mod netns;
pub mod receivers;
pub mod training;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sov_agent::config::{AgentConfig, NodeConfig, TlsConfig};
use sov_agent::transport::ClientTls;
use sov_collector::auth::{DEFAULT_TRUST_DOMAIN, Role};
use sov_collector::config::{CollectorConfig, ServerTlsFiles};
use sov_collector::pki::{self, PathPair};
use sov_proto::pb;
use tokio_util::sync::CancellationToken;

/// A test PKI in its own temporary directory.
#[derive(Debug)]
pub struct Pki {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// `ca.pem`.
    pub ca: PathBuf,
    /// The collector's server certificate.
    pub collector: PathPair,
}

impl Pki {
    /// A fresh CA and collector certificate.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = pki::init(dir.path(), &[], DEFAULT_TRUST_DOMAIN).expect("pki init");
        Self {
            ca: files.ca_cert,
            collector: files.collector,
            dir,
        }
    }

    /// Issue (once) a client certificate for `name` with `role`.
    pub fn client(&self, role: Role, name: &str) -> PathPair {
        let pair = PathPair::in_dir(self.dir.path(), name);
        if pair.cert.exists() {
            return pair;
        }
        pki::issue(self.dir.path(), role, name, DEFAULT_TRUST_DOMAIN).expect("pki issue")
    }

    /// Client TLS material for `name` with `role`.
    pub fn client_tls(&self, role: Role, name: &str) -> ClientTls {
        let pair = self.client(role, name);
        ClientTls::load(&self.ca, &pair.cert, &pair.key, None).expect("load client tls")
    }

    /// Issue (once) a certificate for `name` signed by this CA, like [`Pki::client`] but with
    /// `tweak` applied to its parameters first (validity, key usages, CA flag...).
    pub fn client_with(
        &self,
        role: Role,
        name: &str,
        tweak: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> PathPair {
        let pair = PathPair::in_dir(self.dir.path(), name);
        if pair.cert.exists() {
            return pair;
        }
        let ca_pem = std::fs::read_to_string(&self.ca).expect("ca");
        let ca_key = std::fs::read_to_string(self.dir.path().join(pki::CA_KEY_FILE)).expect("key");
        let ca_key = rcgen::KeyPair::from_pem(&ca_key).expect("ca key");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let spiffe = sov_collector::auth::spiffe_id(DEFAULT_TRUST_DOMAIN, role, name);
        params.subject_alt_names = vec![rcgen::SanType::URI(spiffe.try_into().expect("ia5"))];
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2090, 1, 1);
        tweak(&mut params);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &issuer).expect("sign");
        std::fs::write(&pair.key, key.serialize_pem()).expect("write key");
        std::fs::write(&pair.cert, cert.pem()).expect("write cert");
        pair
    }

    /// Server TLS files for a collector configuration.
    pub fn server_files(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            ca: self.ca.clone(),
            cert: self.collector.cert.clone(),
            key: self.collector.key.clone(),
            revoked: None,
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A collector served from this process on an ephemeral loopback port.
#[derive(Debug)]
pub struct InProcessCollector {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its configuration.
    pub config: CollectorConfig,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessCollector {
    /// Start on `127.0.0.1:0` with data under `data_dir`; `tweak` may change the configuration.
    pub async fn start(
        pki: &Pki,
        data_dir: &Path,
        tweak: impl FnOnce(&mut CollectorConfig),
    ) -> Self {
        Self::start_on("127.0.0.1:0", pki, data_dir, tweak).await
    }

    /// Start on a given address (for example a port agents were already told about).
    pub async fn start_on(
        addr: &str,
        pki: &Pki,
        data_dir: &Path,
        tweak: impl FnOnce(&mut CollectorConfig),
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = CollectorConfig::new(addr, data_dir.to_owned(), pki.server_files());
        tweak(&mut config);
        let store = sov_collector::store::open(&config.store.url, &config.data_dir)
            .await
            .expect("open store");
        let stop = CancellationToken::new();
        let cfg = config.clone();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            sov_collector::app::run(&cfg, store, listener, s.cancelled_owned())
                .await
                .expect("collector run");
        });
        // The gRPC listener is bound above; the HTTPS one is bound inside `run`: wait until it
        // accepts (bounded), so a test's first HTTPS call does not race it.
        if let Some(http) = config.http.listen.filter(|a| a.port() != 0) {
            for _ in 0..600 {
                if task.is_finished() || tokio::net::TcpStream::connect(http).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Self {
            addr,
            config,
            stop,
            task,
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Stop gracefully and wait.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// A free loopback port (bound then released; the caller binds it again soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Weights found only under `roots`, scanned every second and hashed at full speed: not the
/// files that other tests' processes and containers hold at the same time.
pub fn weights_of_roots_only(roots: Vec<PathBuf>) -> sov_agent::config::WeightsConfig {
    sov_agent::config::WeightsConfig {
        roots: Some(roots),
        hash_rate_mb_per_sec: 0,
        scan_interval_secs: 1,
        container_roots: false,
        process_files: false,
        ..Default::default()
    }
}

/// An agent configuration reporting to `urls` every `interval_secs`.
pub fn agent_config(pki: &Pki, node: &str, urls: Vec<String>, spool_dir: &Path) -> AgentConfig {
    let pair = pki.client(Role::Agent, node);
    AgentConfig {
        collector: urls,
        interval_secs: 1,
        spool_dir: spool_dir.to_owned(),
        max_spool_bytes: sov_agent::spool::DEFAULT_MAX_SPOOL_BYTES,
        max_backoff_secs: 1,
        node: NodeConfig {
            name: Some(node.to_owned()),
            site: "rabat-1".to_owned(),
            country: "MA".to_owned(),
            labels: Default::default(),
        },
        tls: TlsConfig {
            ca: pki.ca.clone(),
            cert: pair.cert,
            key: pair.key,
            server_name: Some("localhost".to_owned()),
            renew: true,
        },
        processes: Default::default(),
        gpu: Default::default(),
        budget: Default::default(),
        // No roots: tests that want weights set their own, so the host's models stay out.
        weights: sov_agent::config::WeightsConfig {
            roots: Some(vec![]),
            ..Default::default()
        },
        net: Default::default(),
        metrics: Default::default(),
        training: Default::default(),
    }
}

/// Write an agent configuration as TOML (what an operator would write).
pub fn write_agent_toml(cfg: &AgentConfig, path: &Path) {
    let labels: String = cfg
        .node
        .labels
        .iter()
        .map(|(k, v)| format!("{k:?} = {v:?}\n"))
        .collect();
    let urls: Vec<String> = cfg.collector.iter().map(|u| format!("{u:?}")).collect();
    let roots: Vec<String> = cfg
        .weights
        .roots
        .iter()
        .flatten()
        .map(|r| format!("{r:?}"))
        .collect();
    let text = format!(
        "collector = [{urls}]\ninterval_secs = {interval}\nspool_dir = {spool:?}\nmax_spool_bytes = {max}\nmax_backoff_secs = {backoff}\n\n[node]\nname = {name:?}\nsite = {site:?}\ncountry = {country:?}\n\n[node.labels]\n{labels}\n[tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\nserver_name = {server_name:?}\n\n[weights]\nroots = [{roots}]\nscan_interval_secs = {scan}\nhash_rate_mb_per_sec = {rate}\n",
        roots = roots.join(", "),
        scan = cfg.weights.scan_interval_secs,
        rate = cfg.weights.hash_rate_mb_per_sec,
        urls = urls.join(", "),
        interval = cfg.interval_secs,
        spool = cfg.spool_dir,
        max = cfg.max_spool_bytes,
        backoff = cfg.max_backoff_secs,
        name = cfg.node_name(),
        site = cfg.node.site,
        country = cfg.node.country,
        ca = cfg.tls.ca,
        cert = cfg.tls.cert,
        key = cfg.tls.key,
        server_name = cfg.tls.server_name.as_deref().unwrap_or("localhost"),
    );
    std::fs::write(path, text).expect("write agent config");
}

/// Write a collector configuration as TOML.
pub fn write_collector_toml(cfg: &CollectorConfig, path: &Path) {
    let mut text = format!(
        "listen = \"{}\"\ndata_dir = {:?}\nmax_report_bytes = {}\nmax_connections = {}\ntls_handshake_timeout_secs = {}\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        cfg.listen,
        cfg.data_dir,
        cfg.max_report_bytes,
        cfg.max_connections,
        cfg.tls_handshake_timeout_secs,
        cfg.tls.ca,
        cfg.tls.cert,
        cfg.tls.key
    );
    if let Some(r) = &cfg.tls.revoked {
        text.push_str(&format!("revoked = {r:?}\n"));
    }
    if !cfg.store.url.is_empty() {
        text.push_str(&format!("\n[store]\nurl = {:?}\n", cfg.store.url));
    }
    if let Some(h) = cfg.http.listen {
        text.push_str(&format!("\n[http]\nlisten = \"{h}\"\n"));
    }
    if let Some(m) = cfg.metrics.listen {
        text.push_str(&format!("\n[metrics]\nlisten = \"{m}\"\n"));
    }
    if let Some(p) = &cfg.policy {
        text = format!("policy = {p:?}\n{text}");
    }
    for o in &cfg.geo.overrides {
        text.push_str(&format!(
            "\n[[geo.override]]\ncidr = {:?}\ncountry = {:?}\n",
            o.cidr, o.country
        ));
    }
    if let Some(secs) = cfg.alert.retry_max_secs {
        text.push_str(&format!("\n[alert]\nretry_max_secs = {secs}\n"));
    }
    for w in &cfg.alert.webhook {
        text.push_str(&format!("\n[[alert.webhook]]\nurl = {:?}\n", w.url));
        if let Some(secret) = &w.secret {
            text.push_str(&format!("secret = {secret:?}\n"));
        }
    }
    if let Some(key) = &cfg.enroll.ca_key {
        text.push_str(&format!(
            "\n[enroll]\nca_key = {key:?}\nvalidity_secs = {}\n",
            cfg.enroll.validity_secs
        ));
    }
    if cfg.limits != sov_collector::tls::limits::LimitsConfig::default() {
        let l = &cfg.limits;
        text.push_str(&format!(
            "\n[limits]\nmax_connections_per_address = {}\nanonymous_connection_secs = {}\nmax_reports_in_flight = {}\nmax_reports_in_flight_per_node = {}\n",
            l.max_connections_per_address,
            l.anonymous_connection_secs,
            l.max_reports_in_flight,
            l.max_reports_in_flight_per_node
        ));
    }
    std::fs::write(path, text).expect("write collector config");
}

/// A child process killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Start `bin` (a path from `env!("CARGO_BIN_EXE_…")`) with `args`, logs to `log`.
pub fn spawn(bin: &str, args: &[&str], log: &Path) -> KillOnDrop {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn");
    KillOnDrop(child)
}

/// Path of one of this package's binaries: `CARGO_BIN_EXE_<name>` when Cargo set it for
/// this run, else beside the test executable's `deps/` folder (where Cargo puts them).
pub fn bin_path(name: &str) -> String {
    if let Ok(p) = std::env::var(format!("CARGO_BIN_EXE_{name}")) {
        return p;
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run the tests with cargo test --workspace --no-fail-fast",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// The most a child collector may take to listen while its process is alive.
pub const COLLECTOR_START_BOUND: Duration = Duration::from_secs(180);

/// A collector as a child process (`e2e-collector serve`), killable with SIGKILL.
#[derive(Debug)]
pub struct CollectorProcess {
    child: KillOnDrop,
    addr: SocketAddr,
}

impl CollectorProcess {
    /// Start on `127.0.0.1:port` with its data and log under `work`; waits until it accepts
    /// TCP connections.
    pub fn start(pki: &Pki, work: &Path, port: u16) -> Self {
        Self::start_with(pki, work, port, |_| {})
    }

    /// Like [`CollectorProcess::start`], with `tweak` applied to the configuration first.
    pub fn start_with(
        pki: &Pki,
        work: &Path,
        port: u16,
        tweak: impl FnOnce(&mut CollectorConfig),
    ) -> Self {
        let mut cfg = CollectorConfig::new(
            SocketAddr::from(([127, 0, 0, 1], port)),
            work.join("collector-data"),
            pki.server_files(),
        );
        tweak(&mut cfg);
        let cfg_path = work.join("collector.toml");
        write_collector_toml(&cfg, &cfg_path);
        let n = std::fs::read_dir(work).map(|d| d.count()).unwrap_or(0);
        let log = work.join(format!("collector-{n}.log"));
        let cfg_arg = cfg_path.to_string_lossy().into_owned();
        let mut child = spawn(
            &bin_path("e2e-collector"),
            &["serve", "--config", &cfg_arg],
            &log,
        );
        let addr = cfg.listen;
        let start = Instant::now();
        // The signal is the process itself: a collector that exited failed; one still starting
        // (a busy machine) is waited for, up to a bound far above any start seen here.
        while std::net::TcpStream::connect(addr).is_err() {
            let exited = child.0.try_wait().ok().flatten();
            assert!(
                exited.is_none(),
                "collector exited ({exited:?}) before listening; see {}",
                log.display()
            );
            assert!(
                start.elapsed() < COLLECTOR_START_BOUND,
                "collector still not listening after {COLLECTOR_START_BOUND:?}; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr }
    }

    /// `https://ADDR:PORT` (`127.0.0.1` unless the configuration was changed).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Abort it: SIGKILL, no graceful shutdown.
    pub fn kill9(&mut self) {
        self.child.kill9();
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Whether it is still running (it has not exited or crashed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }
}

/// An agent as a child process (`e2e-agent run --config FILE`), killable with SIGKILL.
#[derive(Debug)]
pub struct AgentProcess {
    child: KillOnDrop,
}

impl AgentProcess {
    /// Start with the configuration file `config`, logging to `log`.
    pub fn start(config: &Path, log: &Path) -> Self {
        let cfg = config.to_string_lossy().into_owned();
        Self {
            child: spawn(&bin_path("e2e-agent"), &["run", "--config", &cfg], log),
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        self.child.kill9();
    }

    /// Whether it is still running (it has not exited or crashed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Its exit status, once it has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.0.try_wait().ok().flatten()
    }
}

/// Every node the collector knows, read with a regulator certificate over mutual TLS.
pub async fn list_nodes(pki: &Pki, url: &str) -> Result<Vec<pb::NodeSummary>, String> {
    let tls = pki.client_tls(Role::Regulator, "test-regulator");
    let channel = tls.connect(url).await.map_err(|e| e.to_string())?;
    let mut client = pb::query_client::QueryClient::new(channel);
    sovctl::fetch_nodes(&mut client)
        .await
        .map_err(|s| s.to_string())
}

/// The summary of one node, if the collector knows it.
pub async fn node(pki: &Pki, url: &str, name: &str) -> Option<pb::NodeSummary> {
    list_nodes(pki, url)
        .await
        .ok()?
        .into_iter()
        .find(|n| n.node == name)
}

/// An Ingest client speaking as `tls`.
pub async fn push_client(
    tls: &ClientTls,
    url: &str,
) -> Result<pb::ingest_client::IngestClient<tonic::transport::Channel>, String> {
    let channel = tls
        .connect(url)
        .await
        .map_err(|e| format!("{e}: {}", sov_agent::run::source_chain(&e)))?;
    Ok(pb::ingest_client::IngestClient::new(channel))
}

/// A minimal valid report for `node`.
pub fn report(node: &str, epoch: u64, seq: u64) -> pb::Report {
    pb::Report {
        epoch,
        seq,
        observed_unix_ms: i64::try_from(seq).unwrap_or(0) + 1_700_000_000_000,
        node_info: Some(pb::NodeInfo {
            node: node.to_owned(),
            site: "rabat-1".to_owned(),
            country: "MA".to_owned(),
            ..Default::default()
        }),
        host: Some(pb::HostSample::default()),
        ..Default::default()
    }
}

/// A weight file of `meta-llama/Llama-3.1-8B` (16 GB safetensors, sha256 `c…c`, identity from
/// the Hugging Face cache) mapped by `vllm` (pid 100), as an agent reports it.
pub fn llama_weight_file() -> pb::WeightFile {
    pb::WeightFile {
        path: "/models/llama.safetensors".into(),
        format: pb::WeightFormat::Safetensors as i32,
        size_bytes: 16_000_000_000,
        sha256: "c".repeat(64),
        identity: Some(pb::ModelIdentity {
            model: "meta-llama/Llama-3.1-8B".into(),
            source: "hf-cache".into(),
            ..Default::default()
        }),
        users: vec![pb::WeightUser {
            pid: 100,
            process: "vllm".into(),
            mapped: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Run this build's `sovctl` against `url` with `pair`'s certificate (trusting `pki`'s CA) and
/// `args` after the global flags; its output.
pub fn sovctl(pki: &Pki, pair: &PathPair, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin_path("e2e-sovctl"))
        .args(["--collector", url, "--ca"])
        .arg(&pki.ca)
        .arg("--cert")
        .arg(&pair.cert)
        .arg("--key")
        .arg(&pair.key)
        .args(args)
        .output()
        .expect("run sovctl")
}

/// Whether a test that needs `what` may run: `present`, or else a loud skip of `test` with
/// `reason` (and a failure instead when the environment variable `required_by` is "1", as
/// `.ci/run` sets it).
pub fn present_or_skip(present: bool, required_by: &str, test: &str, reason: &str) -> bool {
    if present {
        return true;
    }
    assert!(
        std::env::var(required_by).as_deref() != Ok("1"),
        "{test}: required ({required_by}=1) but unavailable: {reason}"
    );
    skipped(
        test,
        &format!("{reason}; set {required_by}=1 to fail instead"),
    );
    false
}

/// An outbound TCP flow from pid 42 to `remote:443` that sent `bytes_sent`, observed now.
pub fn outbound_flow(remote: &str, bytes_sent: u64) -> pb::Flow {
    let now = sov_common::clock::now_unix_ms();
    pb::Flow {
        protocol: pb::Protocol::Tcp as i32,
        direction: pb::Direction::Outbound as i32,
        local_address: "10.0.0.5".to_owned(),
        local_port: 50_000,
        remote_address: remote.to_owned(),
        remote_port: 443,
        pid: 42,
        bytes_sent,
        bytes_known: true,
        connections: 1,
        start_unix_ms: now,
        end_unix_ms: now,
        ..Default::default()
    }
}

/// [`report`] (epoch 1) observed now, carrying `flows`.
pub fn report_with_flows(node: &str, seq: u64, flows: Vec<pb::Flow>) -> pb::Report {
    let mut r = report(node, 1, seq);
    r.observed_unix_ms = sov_common::clock::now_unix_ms();
    r.flows = flows;
    r
}

/// The PostgreSQL URL tests use: `SOV_TEST_POSTGRES_URL`, default the local test database.
pub fn postgres_url() -> String {
    std::env::var("SOV_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Whether a missing PostgreSQL must fail the test (`SOV_REQUIRE_POSTGRES=1`, set by CI).
pub fn postgres_required() -> bool {
    std::env::var("SOV_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// The egress rows of the last hour grouped `by`, asked as a regulator (`alice`).
pub async fn egress_rows(pki: &Pki, url: &str, by: &str) -> Vec<pb::EgressRow> {
    let tls = pki.client_tls(Role::Regulator, "alice");
    let mut q = pb::query_client::QueryClient::new(tls.connect(url).await.expect("connect"));
    let now = sov_common::clock::now_unix_ms();
    q.egress(pb::EgressRequest {
        since_unix_ms: now - 3_600_000,
        until_unix_ms: 0,
        by: by.into(),
        limit: 1000,
    })
    .await
    .expect("egress")
    .into_inner()
    .rows
}

/// Every breach (up to 1,000), asked as a regulator (`alice`).
pub async fn breach_list(pki: &Pki, url: &str) -> Vec<pb::BreachSummary> {
    let tls = pki.client_tls(Role::Regulator, "alice");
    let mut q = pb::query_client::QueryClient::new(tls.connect(url).await.expect("connect"));
    q.list_breaches(pb::ListBreachesRequest {
        limit: 1000,
        ..Default::default()
    })
    .await
    .expect("list breaches")
    .into_inner()
    .breaches
}

/// Says loudly that a test (or part of one) skipped and why: on stderr and as a line in the
/// target directory's list of skipped tests, which `.ci/run` prints at the end.
pub fn skipped(test: &str, reason: &str) {
    sov_agent::skipped::record(test, reason);
}

/// Poll `check` until it returns `Some`, at most `timeout`; panics with `what` otherwise.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a [`while_progressing`] probe saw.
#[derive(Debug)]
pub enum Progress<T, M> {
    /// The awaited state is reached.
    Done(T),
    /// Not yet; `M` marks how far the system got (a sequence number, a counter, bytes on disk).
    At(M),
}

/// Waits for the system itself: polls `probe` until it returns [`Progress::Done`], and fails
/// only when the system stops moving, i.e. the mark [`Progress::At`] carries has not changed
/// for `stall`. A busy machine that is slow but progressing never fails this wait; a stuck one
/// fails after `stall`, however long the whole wait took. The mark must move toward the goal
/// (a seq approaching a target), so the wait is bounded: at most one `stall` per step.
pub async fn while_progressing<T, M, F, Fut>(stall: Duration, what: &str, mut probe: F) -> T
where
    M: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Progress<T, M>>,
{
    let started = Instant::now();
    let mut last: Option<M> = None;
    let mut moved = Instant::now();
    loop {
        match probe().await {
            Progress::Done(v) => return v,
            Progress::At(mark) => {
                if last.as_ref() != Some(&mark) {
                    last = Some(mark);
                    moved = Instant::now();
                }
            }
        }
        assert!(
            moved.elapsed() < stall,
            "no progress for {stall:?} (stuck at {last:?}, {:?} in all) waiting for: {what}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long an agent with this configuration may go without delivering while the collector
/// is up: its longest backoff, one connection attempt and one RPC timeout, one interval, twice
/// over. Derived from the agent's own settings, not guessed.
pub fn agent_stall(cfg: &AgentConfig) -> Duration {
    let once = Duration::from_secs(cfg.max_backoff_secs + cfg.interval_secs)
        + sov_agent::transport::DEFAULT_CONNECT_TIMEOUT
        + sov_agent::transport::DEFAULT_RPC_TIMEOUT;
    2 * once
}

/// Waits until the collector at `url` has stored `node`'s reports up to `min_seq` at least, and
/// returns its summary; fails only when the node's `last_seq` stops moving for `stall`.
pub async fn await_last_seq(
    pki: &Pki,
    url: &str,
    name: &str,
    min_seq: u64,
    stall: Duration,
) -> pb::NodeSummary {
    let what = format!("{name} to reach seq {min_seq}");
    while_progressing(stall, &what, || async {
        match node(pki, url, name).await {
            Some(n) if n.last_seq >= min_seq => Progress::Done(n),
            other => Progress::At(other.map(|n| n.last_seq)),
        }
    })
    .await
}

/// The lower-case hex sha256 of a file, as `sha256sum` (coreutils) prints it: an independent
/// check of the agent's fingerprints.
pub fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A Hugging Face cache entry `models--{org}--{name}` under `hub` (a blob, `refs/main`, and a
/// snapshot symlink to the blob, as the hub client writes them) holding `bytes`; returns the
/// snapshot path. `blob` names the blob file (64 characters, like a sha256).
pub fn hf_cache_model(hub: &Path, org: &str, name: &str, blob: &str, bytes: &[u8]) -> PathBuf {
    let repo = hub.join(format!("models--{org}--{name}"));
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(rev);
    for d in [repo.join("blobs"), repo.join("refs"), snap.clone()] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    std::fs::write(repo.join("blobs").join(blob), bytes).expect("blob");
    std::fs::write(repo.join("refs/main"), rev).expect("ref");
    let file = snap.join("model.safetensors");
    std::os::unix::fs::symlink(format!("../../blobs/{blob}"), &file).expect("symlink");
    file
}

/// What an HTTPS request got back.
#[derive(Debug)]
pub struct HttpsReply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: String,
    /// The body as text.
    pub body: String,
}

impl HttpsReply {
    /// The body parsed as JSON (`null` when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A rustls client configuration trusting the CA certificates in `ca`, presenting `client`
/// (certificate and key) when given.
pub fn client_config(ca: &Path, client: Option<&PathPair>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    Ok(match client {
        Some(pair) => {
            let certs = CertificateDer::pem_file_iter(&pair.cert)
                .map_err(|e| e.to_string())?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            let key = PrivateKeyDer::from_pem_file(&pair.key).map_err(|e| e.to_string())?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| e.to_string())?
        }
        None => builder.with_no_client_auth(),
    })
}

/// A bare TLS handshake with the collector at `addr` (trusting `ca`), presenting `client`
/// when given, then the HTTP/2 preface: `Ok(())` when the collector answers with HTTP/2
/// frames, else the error (for a refused certificate, the TLS alert the collector sent, such
/// as `CertificateExpired` or `CertificateRevoked`).
pub async fn tls_probe(
    ca: &Path,
    client: Option<&PathPair>,
    addr: SocketAddr,
) -> Result<(), String> {
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut config = client_config(ca, client)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
    tls.write_all(&preface)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(20), tls.read(&mut buf)).await {
        Err(_) => Err("no answer".into()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Ok(Ok(0)) => Err("closed".into()),
        Ok(Ok(_)) => Ok(()),
    }
}

/// `GET path` over HTTPS (HTTP/1.1) at `addr`, verifying the collector with `pki.ca`,
/// presenting `client` (certificate and key) when given and `Authorization: Bearer token`
/// when given. A failed handshake is an `Err`.
pub async fn https_get(
    pki: &Pki,
    addr: SocketAddr,
    client: Option<&PathPair>,
    token: Option<&str>,
    path: &str,
) -> Result<HttpsReply, String> {
    https_get_ca(&pki.ca, addr, client, token, path).await
}

/// [`https_get`], verifying the collector with the CA certificate in `ca`.
pub async fn https_get_ca(
    ca: &Path,
    addr: SocketAddr,
    client: Option<&PathPair>,
    token: Option<&str>,
    path: &str,
) -> Result<HttpsReply, String> {
    use http_body_util::BodyExt as _;
    use rustls::pki_types::ServerName;
    let config = client_config(ca, client)?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path).header("host", "localhost");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(HttpsReply {
        status,
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A configuration for `sov-agent scan` in `dir` (state there too): weight roots `roots`,
/// containerd at `containerd_socket` (`""`: not asked) and no other runtime. The TLS files do
/// not exist: `scan` needs none.
pub fn scan_config(dir: &Path, roots: &[&Path], containerd_socket: &str) -> PathBuf {
    let roots: Vec<String> = roots
        .iter()
        .map(|r| format!("{:?}", r.display().to_string()))
        .collect();
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"collector = "https://127.0.0.1:1"
spool_dir = "{state}/spool"
[node]
site = "rabat-1"
country = "MA"
[tls]
ca = "/nonexistent/ca.pem"
cert = "/nonexistent/node.pem"
key = "/nonexistent/node.key"
[weights]
roots = [{roots}]
state_dir = "{state}"
[processes.containers]
containerd_socket = "{containerd_socket}"
crio_socket = ""
docker_socket = ""
podman_socket = ""
"#,
            state = dir.display(),
            roots = roots.join(", "),
        ),
    )
    .expect("write scan config");
    path
}

/// `sov-agent scan --json --window-ms WINDOW --config CONFIG` (the `e2e-agent` binary), parsed.
pub fn agent_scan(config: &Path, window_ms: u64) -> serde_json::Value {
    let out = Command::new(bin_path("e2e-agent"))
        .args([
            "scan",
            "--json",
            "--window-ms",
            &window_ms.to_string(),
            "--config",
        ])
        .arg(config)
        .output()
        .expect("run scan");
    assert!(
        out.status.success(),
        "scan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("scan --json prints JSON")
}
