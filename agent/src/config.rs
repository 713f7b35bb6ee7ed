//! The agent's TOML configuration: strict (unknown keys refused), defaults from named
//! functions, and a validation pass that reports every problem at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
pub use sov_common::config::{
    ConfigError, EXIT_BAD_CONFIG, INSECURE_KEY_MARK, Problems, check_country, check_private_key,
    check_readable, read_toml,
};
pub use sov_common::host::local_hostname;

use crate::spool::DEFAULT_MAX_SPOOL_BYTES;

/// Default seconds between two reports.
pub const DEFAULT_INTERVAL_SECS: u64 = 10;
/// Default spool directory on a real node.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/sov-agent/spool";
/// Smallest spool the agent accepts: a few reports.
pub const MIN_SPOOL_BYTES: u64 = 64 * 1024;
/// Default cap on the reconnect backoff.
pub const DEFAULT_MAX_BACKOFF_SECS: u64 = 60;
/// Default number of top processes by CPU and by memory in every report.
pub const DEFAULT_TOP_N: usize = 10;
/// Default seconds between NVML initialisation attempts after a failure.
pub const DEFAULT_GPU_RETRY_SECS: u64 = 60;

/// `sov-agent` configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Collector URL, or a list of URLs tried in turn on failure (`https://host:port`).
    #[serde(deserialize_with = "one_or_many")]
    pub collector: Vec<String>,
    /// Seconds between two reports. Default 10.
    #[serde(default = "default_interval_secs")]
    pub interval_secs: u64,
    /// Directory of the durable spool; sequence numbers persist while it does.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// Upper bound of the spool on disk; the oldest reports are dropped (and reported as a gap)
    /// beyond it. Default 64 MiB.
    #[serde(default = "default_max_spool_bytes")]
    pub max_spool_bytes: u64,
    /// Upper bound of the reconnect backoff, seconds. Default 60.
    #[serde(default = "default_max_backoff_secs")]
    pub max_backoff_secs: u64,
    /// Who and where this node is.
    pub node: NodeConfig,
    /// Client certificate and the CA that signed the collector's certificate.
    pub tls: TlsConfig,
    /// `[processes]`: which processes every report carries.
    #[serde(default)]
    pub processes: ProcessesConfig,
    /// `[gpu]`: NVIDIA GPU observation.
    #[serde(default)]
    pub gpu: GpuConfig,
    /// `[budget]`: the agent's own resource limits.
    #[serde(default)]
    pub budget: BudgetConfig,
    /// `[weights]`: model weight file discovery.
    #[serde(default)]
    pub weights: WeightsConfig,
    /// `[net]`: outbound traffic per process.
    #[serde(default)]
    pub net: NetConfig,
    /// `[metrics]`: the agent's own health for Prometheus (off by default).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[training]`: training runs (processes writing weight files).
    #[serde(default)]
    pub training: TrainingConfig,
}

/// `[training]`: which processes train, on what, producing what.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Look for training runs at all (needs `[weights]`). Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Milliseconds between two looks at the candidate processes' open files (only processes
    /// that use a weight file or a GPU are looked at). Default 1000.
    #[serde(default = "default_training_sample_interval_ms")]
    pub sample_interval_ms: u64,
    /// Dataset files smaller than this are not reported as a run's inputs. Default 1048576.
    #[serde(default = "default_training_dataset_min_bytes")]
    pub dataset_min_bytes: u64,
    /// Dataset files up to this size are fingerprinted (sha256, once per file version, at the
    /// `[weights] hash_rate_mb_per_sec` rate) so that a policy can class them by content;
    /// larger ones are reported by path and name only. 0 hashes none. Default 268435456.
    #[serde(default = "default_training_dataset_hash_max_bytes")]
    pub dataset_hash_max_bytes: u64,
    /// A candidate's open files are read again only when its I/O counters, virtual size or
    /// number of descriptors moved since their latest read, or after this many seconds (spread
    /// over the samples) even when none did: a file written only through a mapping of a file
    /// opened in place of a closed one is caught by then. 0 reads every candidate at every
    /// sample. Default 120.
    #[serde(default = "default_training_recheck_secs")]
    pub recheck_secs: u64,
    /// A candidate whose I/O counters, virtual size and descriptor count have not moved for
    /// 30 s (a model server with no requests, a trainer between checkpoints doing no I/O) is
    /// looked at only every this many seconds instead of every sample, until they move again;
    /// once still for longer than eight times this, every eighth of its stillness, at most four
    /// times this apart: its first write is then seen within that long. 0 or 1 looks at every
    /// candidate at every sample. Default 4.
    #[serde(default = "default_training_idle_mark_secs")]
    pub idle_mark_secs: u64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sample_interval_ms: default_training_sample_interval_ms(),
            dataset_min_bytes: default_training_dataset_min_bytes(),
            dataset_hash_max_bytes: default_training_dataset_hash_max_bytes(),
            recheck_secs: default_training_recheck_secs(),
            idle_mark_secs: default_training_idle_mark_secs(),
        }
    }
}

fn default_training_sample_interval_ms() -> u64 {
    1000
}
fn default_training_dataset_hash_max_bytes() -> u64 {
    crate::collect::training::DEFAULT_DATASET_HASH_MAX_BYTES
}
fn default_training_recheck_secs() -> u64 {
    crate::collect::training::DEFAULT_RECHECK_SECS
}
fn default_training_idle_mark_secs() -> u64 {
    crate::collect::training::DEFAULT_IDLE_MARK_SECS
}
fn default_training_dataset_min_bytes() -> u64 {
    crate::collect::training::DEFAULT_DATASET_FLOOR_BYTES
}

/// `[processes.containers]`: who each process is (container, image, Kubernetes pod), from the
/// container runtimes' local sockets.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ContainersConfig {
    /// Ask the container runtimes who each container is (name, image, digest, pod). Default
    /// true; false (or no runtime socket present) leaves the cgroup-derived id only.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// containerd's gRPC socket (Kubernetes with containerd, Docker ≥ 23 underneath, `ctr`).
    /// Default "/run/containerd/containerd.sock".
    #[serde(default = "default_containerd_socket")]
    pub containerd_socket: PathBuf,
    /// CRI-O's CRI socket. Default "/var/run/crio/crio.sock".
    #[serde(default = "default_crio_socket")]
    pub crio_socket: PathBuf,
    /// Docker's Engine API socket. Default "/var/run/docker.sock".
    #[serde(default = "default_docker_socket")]
    pub docker_socket: PathBuf,
    /// Podman's Engine API socket (rootful). Default "/run/podman/podman.sock".
    #[serde(default = "default_podman_socket")]
    pub podman_socket: PathBuf,
    /// Seconds between two listings of each runtime's containers (a process in a container
    /// not listed yet triggers one sooner). Default 30.
    #[serde(default = "default_containers_refresh_secs")]
    pub refresh_secs: u64,
    /// Longest wait for one runtime's answer, milliseconds. Default 2000.
    #[serde(default = "default_containers_timeout_ms")]
    pub timeout_ms: u64,
}

impl Default for ContainersConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            containerd_socket: default_containerd_socket(),
            crio_socket: default_crio_socket(),
            docker_socket: default_docker_socket(),
            podman_socket: default_podman_socket(),
            refresh_secs: default_containers_refresh_secs(),
            timeout_ms: default_containers_timeout_ms(),
        }
    }
}

/// Default `[processes.containers] containerd_socket`.
pub const DEFAULT_CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Default `[processes.containers] crio_socket`.
pub const DEFAULT_CRIO_SOCKET: &str = "/var/run/crio/crio.sock";
/// Default `[processes.containers] docker_socket`.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Default `[processes.containers] podman_socket`.
pub const DEFAULT_PODMAN_SOCKET: &str = "/run/podman/podman.sock";

fn default_containerd_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTAINERD_SOCKET)
}
fn default_crio_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CRIO_SOCKET)
}
fn default_docker_socket() -> PathBuf {
    PathBuf::from(DEFAULT_DOCKER_SOCKET)
}
fn default_podman_socket() -> PathBuf {
    PathBuf::from(DEFAULT_PODMAN_SOCKET)
}
fn default_containers_refresh_secs() -> u64 {
    30
}
fn default_containers_timeout_ms() -> u64 {
    2000
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address serving `GET /metrics` in the Prometheus text format over plain HTTP, e.g.
    /// "127.0.0.1:9465". Default: none (off).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// `[net]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Observe network flows. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds between two socket samples (flows are summed into the next report). Default 5.
    #[serde(default = "default_net_interval_secs")]
    pub interval_secs: u64,
    /// Count traffic to loopback addresses (127.0.0.0/8, ::1). Default false.
    #[serde(default)]
    pub include_loopback: bool,
    /// Count traffic to link-local addresses (169.254.0.0/16, fe80::/10). Default false.
    #[serde(default)]
    pub include_link_local: bool,
    /// Most distinct flows kept between two reports; beyond it the smallest are summed into
    /// one flow per process with remote address "other". Default 10000.
    #[serde(default = "default_max_flows")]
    pub max_flows_per_report: usize,
    /// Observe every network namespace on the node (containers, Kubernetes pods), not only the
    /// agent's own: each is entered once with `setns` (needs `CAP_SYS_ADMIN`; without it, its
    /// sockets are read from `/proc/<pid>/net` without byte counts). Default true.
    #[serde(default = "default_true")]
    pub all_namespaces: bool,
    /// Most network namespaces observed at once (the agent's own included); beyond it the ones
    /// with the fewest processes are left out and counted. Default 1024.
    #[serde(default = "default_max_namespaces")]
    pub max_namespaces: usize,
    /// Let the agent set `net.netfilter.nf_conntrack_acct = 1` in every network namespace it
    /// observes (the host's included), so that UDP bytes are counted by connection tracking.
    /// Off by default: the agent then only reads, and says once per namespace how to enable
    /// it. The agent never changes a firewall. Default false.
    #[serde(default)]
    pub conntrack_accounting: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_secs: default_net_interval_secs(),
            include_loopback: false,
            include_link_local: false,
            max_flows_per_report: default_max_flows(),
            all_namespaces: true,
            max_namespaces: default_max_namespaces(),
            conntrack_accounting: false,
        }
    }
}

fn default_max_namespaces() -> usize {
    1024
}

fn default_net_interval_secs() -> u64 {
    5
}
fn default_max_flows() -> usize {
    10_000
}

/// `[weights]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsConfig {
    /// Look for weight files at all. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Directories to search, replacing the defaults (Hugging Face caches, Ollama stores,
    /// /models, /opt/models, /srv/models, /data/models) when given.
    #[serde(default)]
    pub roots: Option<Vec<PathBuf>>,
    /// Seconds between two scans of the roots. Default 60.
    #[serde(default = "default_weights_scan_interval_secs")]
    pub scan_interval_secs: u64,
    /// Read rate for fingerprinting (sha256), MB per second; 0 = unlimited. Default 100.
    #[serde(default = "default_hash_rate_mb_per_sec")]
    pub hash_rate_mb_per_sec: u64,
    /// Seconds between two full inventories sent to the collector (changes are sent at once).
    /// Default 3600.
    #[serde(default = "default_full_inventory_secs")]
    pub full_inventory_secs: u64,
    /// Directory of the agent's state (the fingerprint cache). Default: the spool's parent
    /// directory.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Also search the roots inside every container's own filesystem (once per distinct mount
    /// namespace, through `/proc/<pid>/root`), e.g. `/root/.cache/huggingface/hub` of a vLLM
    /// container. Default true.
    #[serde(default = "default_true")]
    pub container_roots: bool,
    /// Also examine the files processes map or hold open (`/proc/<pid>/maps`, `fd/`), wherever
    /// they live (outside every root, inside a container, deleted). Default true.
    #[serde(default = "default_true")]
    pub process_files: bool,
    /// Files processes use that are smaller than this are not examined. Default 1048576
    /// (1 MiB: shared libraries and small data files are skipped at no cost).
    #[serde(default = "default_process_min_file_bytes")]
    pub process_min_file_bytes: u64,
    /// Most files found through processes or inside containers whose content is examined in
    /// one scan (each once per device and inode); the rest wait for the next scan. Default 256.
    #[serde(default = "default_max_new_files_per_scan")]
    pub max_new_files_per_scan: usize,
}

impl Default for WeightsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            roots: None,
            scan_interval_secs: default_weights_scan_interval_secs(),
            hash_rate_mb_per_sec: default_hash_rate_mb_per_sec(),
            full_inventory_secs: default_full_inventory_secs(),
            state_dir: None,
            container_roots: true,
            process_files: true,
            process_min_file_bytes: default_process_min_file_bytes(),
            max_new_files_per_scan: default_max_new_files_per_scan(),
        }
    }
}

fn default_process_min_file_bytes() -> u64 {
    1 << 20
}
fn default_max_new_files_per_scan() -> usize {
    256
}

fn default_weights_scan_interval_secs() -> u64 {
    60
}
fn default_hash_rate_mb_per_sec() -> u64 {
    100
}
fn default_full_inventory_secs() -> u64 {
    3600
}

/// `[processes]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessesConfig {
    /// The busiest N processes by CPU and the largest N by memory go into every report
    /// (plus every GPU user). Default 10; 0 reports only GPU users.
    #[serde(default = "default_top_n")]
    pub top_n: usize,
    /// A process that used no CPU at its latest read is read again (`/proc/<pid>/stat`) at
    /// least this often, spread over the samples; busy, new, top-memory and interesting
    /// processes are read every sample. So a process that wakes up after being idle reaches
    /// the top N within this many seconds, and its CPU is averaged over the time since its
    /// previous read (no tick is lost). 0 reads every process every sample. Default 60.
    #[serde(default = "default_idle_recheck_secs")]
    pub idle_recheck_secs: u64,
    /// `[processes.containers]`: who each process is in container terms (container, image,
    /// Kubernetes pod), asked of the container runtimes over their local sockets.
    #[serde(default)]
    pub containers: ContainersConfig,
}

/// `[gpu]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// Observe NVIDIA GPUs through NVML. Default true (a node without the driver reports
    /// `unavailable` and carries on).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds between attempts to initialise NVML after it failed. Default 60.
    #[serde(default = "default_gpu_retry_secs")]
    pub retry_secs: u64,
}

/// `[budget]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Resident memory above which the agent sheds optional work. Default 128 MiB.
    #[serde(default = "default_max_rss_bytes")]
    pub max_rss_bytes: u64,
    /// CPU share (percent of one CPU, averaged over an interval) above which the agent sheds
    /// optional work. Default 5.
    #[serde(default = "default_max_cpu_percent")]
    pub max_cpu_percent: f32,
}

impl Default for ProcessesConfig {
    fn default() -> Self {
        Self {
            top_n: default_top_n(),
            idle_recheck_secs: default_idle_recheck_secs(),
            containers: ContainersConfig::default(),
        }
    }
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            retry_secs: default_gpu_retry_secs(),
        }
    }
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            max_rss_bytes: default_max_rss_bytes(),
            max_cpu_percent: default_max_cpu_percent(),
        }
    }
}

fn default_idle_recheck_secs() -> u64 {
    60
}
fn default_top_n() -> usize {
    DEFAULT_TOP_N
}
fn default_true() -> bool {
    true
}
fn default_gpu_retry_secs() -> u64 {
    DEFAULT_GPU_RETRY_SECS
}
fn default_max_rss_bytes() -> u64 {
    crate::budget::DEFAULT_MAX_RSS_BYTES
}
fn default_max_cpu_percent() -> f32 {
    crate::budget::DEFAULT_MAX_CPU_PERCENT
}

/// `[node]`: the node's identity and declared location.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name; must equal the name in the client certificate. Default: the host name.
    #[serde(default)]
    pub name: Option<String>,
    /// Data center this node is in.
    pub site: String,
    /// ISO 3166-1 alpha-2 country of the site, e.g. "MA".
    pub country: String,
    /// Free-form labels reported with every report.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `[tls]`: PEM files for mutual TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate that signed the collector's certificate.
    pub ca: PathBuf,
    /// This node's client certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
    /// Name to verify in the collector's certificate instead of the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Renew the certificate from the collector (`Enroll.Renew`) at two thirds of its
    /// lifetime, and use the new one without a restart. Default true; the collector must
    /// have `[enroll] ca_key`, else the agent logs the refusal and retries later.
    #[serde(default = "default_true")]
    pub renew: bool,
}

fn default_interval_secs() -> u64 {
    DEFAULT_INTERVAL_SECS
}
fn default_spool_dir() -> PathBuf {
    PathBuf::from(DEFAULT_SPOOL_DIR)
}
fn default_max_spool_bytes() -> u64 {
    DEFAULT_MAX_SPOOL_BYTES
}
fn default_max_backoff_secs() -> u64 {
    DEFAULT_MAX_BACKOFF_SECS
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Check a collector URL: `https://host:port`.
pub fn check_collector_url(problems: &mut Problems, field: &str, value: &str) {
    match value.parse::<tonic::transport::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => {}
        Ok(_) => problems.push(
            field,
            format!("{value:?} must be an https URL with a host, e.g. \"https://collector.example:7443\""),
        ),
        Err(e) => problems.push(field, format!("{value:?} is not a URL: {e}")),
    }
}

/// A node name: the same rules the collector applies to certificate names.
pub fn check_node_name(problems: &mut Problems, field: &str, value: &str) {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !value.starts_with(['.', '-']);
    if !ok {
        problems.push(
            field,
            format!(
                "{value:?} must be 1-128 characters of A-Z a-z 0-9 . _ - and not start with . or -"
            ),
        );
    }
}

impl AgentConfig {
    /// Load and validate a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, false)
    }

    /// [`AgentConfig::load`]; with `allow_insecure_keys`, a private key readable by group or
    /// others is a warning (logged) instead of a problem.
    pub fn load_with(path: &Path, allow_insecure_keys: bool) -> Result<Self, ConfigError> {
        let cfg: Self = read_toml(path)?;
        let mut problems = cfg.validate();
        if allow_insecure_keys {
            problems.0.retain(|p| {
                let insecure = p.contains(INSECURE_KEY_MARK);
                if insecure {
                    tracing::warn!(problem = %p, "insecure private key allowed by --allow-insecure-keys");
                }
                !insecure
            });
        }
        problems.into_result()?;
        Ok(cfg)
    }

    /// `--check-config`'s look at the TLS files (when all three can be read): this node's
    /// certificate's validity dates, that the key is its key, and that it chains to `[tls] ca`
    /// as a client certificate; each problem in plain words ("expired on …").
    pub fn check_certificates(&self, problems: &mut Problems) {
        let t = &self.tls;
        if [&t.ca, &t.cert, &t.key]
            .iter()
            .all(|p| std::fs::File::open(p).is_ok())
        {
            sov_common::tls_diagnose::check_files(
                problems,
                None,
                "tls",
                sov_common::tls_diagnose::CertFiles {
                    ca: &t.ca,
                    cert: &t.cert,
                    key: &t.key,
                },
                sov_common::tls_diagnose::Side::Client,
                rustls::pki_types::UnixTime::now(),
            );
        }
    }

    /// The node name: the configured one or the host name.
    pub fn node_name(&self) -> String {
        self.node.name.clone().unwrap_or_else(local_hostname)
    }

    /// Every problem in the configuration.
    pub fn validate(&self) -> Problems {
        let mut p = Problems::default();
        if self.collector.is_empty() {
            p.push("collector", "at least one collector URL is required");
        }
        for (i, url) in self.collector.iter().enumerate() {
            check_collector_url(&mut p, &format!("collector[{i}]"), url);
        }
        if !(1..=3600).contains(&self.interval_secs) {
            p.push(
                "interval_secs",
                format!("{} is out of range 1..=3600", self.interval_secs),
            );
        }
        if self.max_spool_bytes < MIN_SPOOL_BYTES {
            p.push(
                "max_spool_bytes",
                format!(
                    "{} is below the minimum of {MIN_SPOOL_BYTES} bytes",
                    self.max_spool_bytes
                ),
            );
        }
        if !(1..=3600).contains(&self.max_backoff_secs) {
            p.push(
                "max_backoff_secs",
                format!("{} is out of range 1..=3600", self.max_backoff_secs),
            );
        }
        if self.spool_dir.as_os_str().is_empty() {
            p.push("spool_dir", "must not be empty");
        }
        check_node_name(&mut p, "node.name", &self.node_name());
        if self.node.site.trim().is_empty() {
            p.push("node.site", "must not be empty");
        }
        check_country(&mut p, "node.country", &self.node.country);
        for k in self.node.labels.keys() {
            if k.is_empty() || k.len() > 64 {
                p.push(
                    "node.labels",
                    format!("label key {k:?} must be 1-64 characters"),
                );
            }
        }
        check_readable(&mut p, "tls.ca", &self.tls.ca);
        check_readable(&mut p, "tls.cert", &self.tls.cert);
        check_readable(&mut p, "tls.key", &self.tls.key);
        check_private_key(&mut p, "tls.key", &self.tls.key);
        if self.processes.top_n > 1000 {
            p.push(
                "processes.top_n",
                format!("{} is out of range 0..=1000", self.processes.top_n),
            );
        }
        if !(1..=86_400).contains(&self.gpu.retry_secs) {
            p.push(
                "gpu.retry_secs",
                format!("{} is out of range 1..=86400", self.gpu.retry_secs),
            );
        }
        if !(100..=60_000).contains(&self.training.sample_interval_ms) {
            p.push(
                "training.sample_interval_ms",
                format!(
                    "{} is out of range 100..=60000",
                    self.training.sample_interval_ms
                ),
            );
        }
        if self.training.idle_mark_secs > 300 {
            p.push(
                "training.idle_mark_secs",
                format!(
                    "{} is out of range 0..=300 (a process still for 30 s is looked at this \
                     often: a longer wait hides a checkpoint written in less time)",
                    self.training.idle_mark_secs
                ),
            );
        }
        if !(1..=86_400).contains(&self.weights.scan_interval_secs) {
            p.push(
                "weights.scan_interval_secs",
                format!(
                    "{} is out of range 1..=86400",
                    self.weights.scan_interval_secs
                ),
            );
        }
        if !(60..=604_800).contains(&self.weights.full_inventory_secs) {
            p.push(
                "weights.full_inventory_secs",
                format!(
                    "{} is out of range 60..=604800",
                    self.weights.full_inventory_secs
                ),
            );
        }
        if !(1..=100_000).contains(&self.weights.max_new_files_per_scan) {
            p.push(
                "weights.max_new_files_per_scan",
                format!(
                    "{} is out of range 1..=100000",
                    self.weights.max_new_files_per_scan
                ),
            );
        }
        if let Some(roots) = &self.weights.roots {
            for (i, r) in roots.iter().enumerate() {
                if !r.is_absolute() {
                    p.push(
                        &format!("weights.roots[{i}]"),
                        format!("{} must be an absolute path", r.display()),
                    );
                }
            }
        }
        if !(1..=3600).contains(&self.processes.containers.refresh_secs) {
            p.push(
                "processes.containers.refresh_secs",
                format!(
                    "{} is out of range 1..=3600",
                    self.processes.containers.refresh_secs
                ),
            );
        }
        if !(10..=60_000).contains(&self.processes.containers.timeout_ms) {
            p.push(
                "processes.containers.timeout_ms",
                format!(
                    "{} is out of range 10..=60000",
                    self.processes.containers.timeout_ms
                ),
            );
        }
        for (field, path) in [
            (
                "processes.containers.containerd_socket",
                &self.processes.containers.containerd_socket,
            ),
            (
                "processes.containers.crio_socket",
                &self.processes.containers.crio_socket,
            ),
            (
                "processes.containers.docker_socket",
                &self.processes.containers.docker_socket,
            ),
            (
                "processes.containers.podman_socket",
                &self.processes.containers.podman_socket,
            ),
        ] {
            if !path.as_os_str().is_empty() && !path.is_absolute() {
                p.push(
                    field,
                    format!(
                        "{} must be an absolute path (or \"\" to never ask)",
                        path.display()
                    ),
                );
            }
        }
        if !(1..=3600).contains(&self.net.interval_secs) {
            p.push(
                "net.interval_secs",
                format!("{} is out of range 1..=3600", self.net.interval_secs),
            );
        }
        if !(1..=100_000).contains(&self.net.max_namespaces) {
            p.push(
                "net.max_namespaces",
                format!("{} is out of range 1..=100000", self.net.max_namespaces),
            );
        }
        if !(1..=1_000_000).contains(&self.net.max_flows_per_report) {
            p.push(
                "net.max_flows_per_report",
                format!(
                    "{} is out of range 1..=1000000",
                    self.net.max_flows_per_report
                ),
            );
        }
        if self.budget.max_rss_bytes < 16 * 1024 * 1024 {
            p.push(
                "budget.max_rss_bytes",
                format!(
                    "{} is below the minimum of 16 MiB",
                    self.budget.max_rss_bytes
                ),
            );
        }
        if !(self.budget.max_cpu_percent > 0.0 && self.budget.max_cpu_percent <= 100.0) {
            p.push(
                "budget.max_cpu_percent",
                format!("{} is out of range (0, 100]", self.budget.max_cpu_percent),
            );
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, toml::de::Error> {
        toml::from_str(text)
    }

    const GOOD: &str = r#"
        collector = "https://127.0.0.1:7443"
        spool_dir = "/tmp/x"
        [node]
        name = "node-a"
        site = "rabat-1"
        country = "MA"
        [tls]
        ca = "/nonexistent/ca.pem"
        cert = "/nonexistent/a.pem"
        key = "/nonexistent/a.key"
    "#;

    #[test]
    fn defaults_apply_when_keys_are_absent() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.interval_secs, DEFAULT_INTERVAL_SECS);
        assert_eq!(c.max_spool_bytes, DEFAULT_MAX_SPOOL_BYTES);
        assert_eq!(c.collector, vec!["https://127.0.0.1:7443".to_owned()]);
    }

    #[test]
    fn training_defaults_apply_and_a_bad_sample_interval_or_key_is_refused() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.training, TrainingConfig::default());
        assert_eq!(c.training.sample_interval_ms, 1000);
        let bad = parse(&format!("{GOOD}\n[training]\nsample_interval_ms = 5\n")).unwrap();
        let problems = bad.validate().to_string();
        assert!(
            problems.contains("training.sample_interval_ms") && problems.contains('5'),
            "{problems}"
        );
        assert!(parse(&format!("{GOOD}\n[training]\nsample_ms = 5\n")).is_err());
        assert_eq!(c.training.idle_mark_secs, 4);
        let bad = parse(&format!("{GOOD}\n[training]\nidle_mark_secs = 301\n")).unwrap();
        let problems = bad.validate().to_string();
        assert!(
            problems.contains("training.idle_mark_secs") && problems.contains("301"),
            "{problems}"
        );
        let ok = parse(&format!("{GOOD}\n[training]\nidle_mark_secs = 0\n")).unwrap();
        assert!(!ok.validate().to_string().contains("idle_mark_secs"));
    }

    #[test]
    fn a_private_key_readable_by_group_or_others_is_refused_unless_allowed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "a.pem", "a.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let key = dir.path().join("a.key");
        let text = GOOD.replace("/nonexistent", &dir.path().display().to_string());
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        for (mode, refused) in [
            (0o644, true),
            (0o640, true),
            (0o604, true),
            (0o600, false),
            (0o400, false),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let result = AgentConfig::load(&path);
            assert_eq!(result.is_err(), refused, "mode {mode:o}: {result:?}");
            if let Err(e) = result {
                let text = e.to_string();
                assert!(
                    text.contains("tls.key") && text.contains(&format!("mode {mode:04o}")),
                    "{text}"
                );
                assert!(
                    text.contains("chmod 600") && text.contains("--allow-insecure-keys"),
                    "{text}"
                );
            }
            assert!(
                AgentConfig::load_with(&path, true).is_ok(),
                "mode {mode:o} allowed"
            );
        }
    }

    #[test]
    fn collector_accepts_a_list_of_urls() {
        let text = GOOD.replace(
            r#"collector = "https://127.0.0.1:7443""#,
            r#"collector = ["https://a:1", "https://b:2"]"#,
        );
        assert_eq!(parse(&text).unwrap().collector.len(), 2);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let text = format!("{GOOD}\nbogus_key = 1\n");
        // The unknown key lands in [tls] because it follows that table.
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("bogus_key"), "{err}");
    }

    #[test]
    fn validation_reports_every_problem_at_once() {
        let text = GOOD
            .replace("\"MA\"", "\"Morocco\"")
            .replace("https://127.0.0.1:7443", "http://x")
            .replace("spool_dir", "interval_secs = 0\nspool_dir");
        let problems = parse(&text).unwrap().validate();
        let all = problems.to_string();
        for needle in [
            "node.country",
            "collector[0]",
            "interval_secs",
            "tls.ca",
            "tls.cert",
            "tls.key",
        ] {
            assert!(all.contains(needle), "missing {needle} in {all}");
        }
        assert!(all.contains("\"Morocco\""), "{all}");
    }

    #[test]
    fn the_example_config_in_deploy_parses_and_names_its_node() {
        let c = parse(include_str!("../../deploy/agent.toml")).unwrap();
        assert_eq!(c.collector.len(), 2);
        assert_eq!(c.node_name(), "gpu-node-01");
        assert_eq!(c.node.country, "MA");
        // Only the certificate files are missing on this machine.
        let problems = c.validate();
        assert!(
            problems.0.iter().all(|p| p.starts_with("tls.")),
            "{problems}"
        );
    }

    #[test]
    fn a_node_name_with_a_slash_is_refused() {
        let mut p = Problems::default();
        check_node_name(&mut p, "node.name", "a/b");
        assert!(!p.is_empty());
        let mut ok = Problems::default();
        check_node_name(&mut ok, "node.name", "gpu-node-01.rabat");
        assert!(ok.is_empty(), "{ok}");
    }
}
