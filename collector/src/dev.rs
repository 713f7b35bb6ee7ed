//! `sov-collector dev`: the quickstart. Under one data directory it creates (first start) or
//! reuses a development PKI, runs the collector on embedded SQLite on 127.0.0.1:7443, and runs
//! an agent for this host in the same process. It prints where everything is and a
//! ready-to-paste `sovctl` command.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sov_agent::config::{AgentConfig, NodeConfig, TlsConfig};
use sov_common::host::local_hostname;
use tokio_util::sync::CancellationToken;

use crate::auth::DEFAULT_TRUST_DOMAIN;
use crate::config::{CollectorConfig, ServerTlsFiles};
use crate::store::SqliteStore;

/// Default data directory of the dev mode, relative to the working directory.
pub const DEFAULT_DEV_DIR: &str = ".sovereign-dev";
/// Default dev listen address.
pub const DEFAULT_DEV_LISTEN: &str = "127.0.0.1:7443";

/// Flags of `sov-collector dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Directory for the database, the PKI and the agent's spool (created on first start).
    #[arg(long, default_value = DEFAULT_DEV_DIR)]
    pub data_dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, default_value = DEFAULT_DEV_LISTEN)]
    pub listen: SocketAddr,
    /// Seconds between the in-process agent's reports.
    #[arg(long, default_value_t = 5)]
    pub interval_secs: u64,
    /// Country the in-process agent declares for this host.
    #[arg(long, default_value = "ZZ")]
    pub country: String,
    /// Site the in-process agent declares for this host.
    #[arg(long, default_value = "dev")]
    pub site: String,
}

/// A node name usable in a certificate, made from this host's name.
pub fn dev_node_name() -> String {
    let cleaned: String = local_hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let trimmed = cleaned.trim_start_matches(['.', '-']);
    // These names belong to the dev PKI's own files.
    if trimmed.is_empty() || ["ca", "collector", "regulator", "admin"].contains(&trimmed) {
        "dev-node".to_owned()
    } else {
        trimmed.to_owned()
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// Run the dev mode until `shutdown` completes.
pub async fn run(args: DevArgs, shutdown: impl Future<Output = ()>) -> Result<(), anyhow::Error> {
    let dir = absolute(&args.data_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let node = dev_node_name();
    let pki = crate::pki::ensure_dev(&dir.join("pki"), &node, DEFAULT_TRUST_DOMAIN)?;
    let collector_cfg = CollectorConfig::new(
        args.listen,
        dir.join("collector"),
        ServerTlsFiles {
            ca: pki.ca.clone(),
            cert: pki.collector.cert.clone(),
            key: pki.collector.key.clone(),
            revoked: None,
        },
    );
    let url = format!("https://{}", args.listen);
    let agent_cfg = AgentConfig {
        collector: vec![url.clone()],
        interval_secs: args.interval_secs,
        spool_dir: dir.join("agent-spool"),
        max_spool_bytes: sov_agent::spool::DEFAULT_MAX_SPOOL_BYTES,
        max_backoff_secs: 10,
        node: NodeConfig {
            name: Some(node.clone()),
            site: args.site.clone(),
            country: args.country.clone(),
            labels: [("mode".to_owned(), "dev".to_owned())]
                .into_iter()
                .collect(),
        },
        tls: TlsConfig {
            ca: pki.ca.clone(),
            cert: pki.agent.cert.clone(),
            key: pki.agent.key.clone(),
            server_name: Some("localhost".to_owned()),
            renew: true,
        },
        processes: Default::default(),
        gpu: Default::default(),
        budget: Default::default(),
        weights: Default::default(),
        net: Default::default(),
        metrics: Default::default(),
    };
    let problems = agent_cfg.validate();
    if !problems.is_empty() {
        anyhow::bail!("dev agent configuration is invalid:\n{problems}");
    }
    let store = Arc::new(SqliteStore::open(&collector_cfg.data_dir)?);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {e} (is another dev collector running? use --listen)",
                args.listen
            )
        })?;
    let agent = sov_agent::Agent::open(agent_cfg)?;

    let ctl = format!(
        "cargo run -q -p sov-collector --bin sovctl -- --collector {url} --ca {} --cert {} --key {} nodes",
        pki.ca.display(),
        pki.regulator.cert.display(),
        pki.regulator.key.display()
    );
    println!("Sovereign dev mode");
    println!("  collector   {url} (gRPC, mutual TLS)");
    println!(
        "  database    {}",
        collector_cfg
            .data_dir
            .join(crate::store::sqlite::DB_FILE)
            .display()
    );
    println!("  pki         {}", dir.join("pki").display());
    println!(
        "  agent       node {node:?}, site {:?}, country {:?}, a report every {}s",
        args.site, args.country, args.interval_secs
    );
    println!("  spool       {}", dir.join("agent-spool").display());
    println!();
    println!("See what the collector knows (a regulator certificate is ready):");
    println!("  {ctl}");
    println!();
    println!("Stop with Ctrl-C.");

    let stop = CancellationToken::new();
    let agent_task = tokio::spawn(agent.run(stop.clone()));
    let stop_server = stop.clone();
    let server = crate::app::run(&collector_cfg, store, listener, async move {
        tokio::select! {
            () = shutdown => {}
            () = stop_server.cancelled() => {}
        }
    });
    let served = server.await;
    stop.cancel();
    let agent_result = agent_task.await;
    served?;
    agent_result??;
    Ok(())
}
