//! `sov-collector dev`: the quickstart. Under one data directory it creates (first start) or
//! reuses a development PKI, runs the collector on embedded SQLite on 127.0.0.1:7443 with the
//! web page and HTTPS API on 127.0.0.1:8443, loads a policy for the declared country, and runs
//! an agent for this host in the same process. It prints where everything is, the web page's
//! address with a token made for this run, and a ready-to-paste `sovctl` command.
//!
//! Without `--demo` everything shown is what the agent really observes on this host (loopback
//! traffic only with `--include-loopback`); `--demo` adds the labelled demonstration of
//! [`demo`].

pub mod demo;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sov_agent::config::{AgentConfig, NodeConfig, TlsConfig};
use sov_common::host::local_hostname;
use tokio_util::sync::CancellationToken;

use crate::auth::{DEFAULT_TRUST_DOMAIN, Role};
use crate::config::{CollectorConfig, GeoOverride, ServerTlsFiles, WebhookSinkConfig};
use crate::store::{SqliteStore, Store};

/// Default data directory of the dev mode, relative to the working directory.
pub const DEFAULT_DEV_DIR: &str = ".sovereign-dev";
/// Default dev listen address.
pub const DEFAULT_DEV_LISTEN: &str = "127.0.0.1:7443";
/// Default dev address of the web page and HTTPS API.
pub const DEFAULT_DEV_HTTP_LISTEN: &str = "127.0.0.1:8443";
/// Lifetime of the web page token printed at each start.
pub const DEV_TOKEN_LIFETIME_MS: i64 = 7 * 86_400_000;
/// The line that starts the printed `sovctl` command (scripts look for it).
pub const SOVCTL_LINE_PREFIX: &str = "  cargo run -q -p sovctl -- ";
/// The label before the web page's address in what `dev` prints.
pub const WEB_LINE_LABEL: &str = "  web page    ";

/// Flags of `sov-collector dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Directory for the database, the PKI and the agent's spool (created on first start).
    #[arg(long, default_value = DEFAULT_DEV_DIR)]
    pub data_dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, default_value = DEFAULT_DEV_LISTEN)]
    pub listen: SocketAddr,
    /// Address of the web page and HTTPS JSON API.
    #[arg(long, default_value = DEFAULT_DEV_HTTP_LISTEN)]
    pub http_listen: SocketAddr,
    /// Seconds between the in-process agent's reports.
    #[arg(long, default_value_t = 5)]
    pub interval_secs: u64,
    /// Country the in-process agent declares for this host; the generated policy defends it.
    #[arg(long, default_value = "ZZ")]
    pub country: String,
    /// Site the in-process agent declares for this host.
    #[arg(long, default_value = "dev")]
    pub site: String,
    /// Policy file to use instead of the one generated for --country (DATA_DIR/policy.toml).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Also count traffic to loopback addresses (127.0.0.0/8, ::1), placed in --country.
    #[arg(long)]
    pub include_loopback: bool,
    /// Add a labelled demonstration: a loopback endpoint placed abroad, a process holding
    /// restricted weights that sends to it, and an alert receiver that prints the alerts.
    #[arg(long)]
    pub demo: bool,
}

/// The policy `dev` writes for `country` (when no --policy is given): the jurisdiction, the
/// demo's model as restricted, and the default thresholds.
pub fn dev_policy(country: &str) -> String {
    format!(
        "# Written by `sov-collector dev` at every start for --country {country}; pass\n\
         # --policy FILE to use your own. Every key: deploy/policy.toml and the README.\n\
         jurisdiction = \"{country}\"\n\n\
         # The model of `dev --demo` (a generated file); absent without --demo.\n\
         [[model]]\n\
         match = \"{org}/*\"\n\
         class = \"restricted\"\n",
        org = demo::DEMO_ORG_ID,
    )
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

/// What `--demo` started: printed, then stopped with the dev mode.
struct Demo {
    endpoint: SocketAddr,
    receiver: SocketAddr,
    weights: PathBuf,
    sender: demo::SenderChild,
    foreign: &'static str,
}

/// Start the demo's endpoint, receiver and sender (see [`demo`]); the geo override and the
/// webhook sink are added to `cfg`.
async fn start_demo(
    dir: &Path,
    country: &str,
    cfg: &mut CollectorConfig,
    stop: &CancellationToken,
) -> Result<Demo, anyhow::Error> {
    let foreign = demo::demo_foreign_country(country);
    let endpoint_listener = demo::bind_endpoint()
        .await
        .map_err(|e| anyhow::anyhow!("demo: cannot listen on {}: {e}", demo::DEMO_ABROAD_IP))?;
    let endpoint = endpoint_listener.local_addr()?;
    let receiver_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver = receiver_listener.local_addr()?;
    let weights = demo::write_weights(&dir.join("demo").join("hub"))
        .map_err(|e| anyhow::anyhow!("demo: cannot write the demo weights: {e}"))?;
    cfg.geo.overrides.push(GeoOverride {
        cidr: format!("{}/32", demo::DEMO_ABROAD_IP),
        country: foreign.to_owned(),
        asn: None,
        org: Some(demo::DEMO_ORG.to_owned()),
        operator_country: None,
    });
    cfg.alert.webhook.push(WebhookSinkConfig {
        url: format!("http://{receiver}/alerts"),
        ..Default::default()
    });
    tokio::spawn(demo::endpoint(endpoint_listener, stop.clone()));
    tokio::spawn(demo::receiver(receiver_listener, stop.clone()));
    let exe = demo::sender_executable(&dir.join("demo"))
        .map_err(|e| anyhow::anyhow!("demo: cannot copy this executable for the sender: {e}"))?;
    let sender = std::process::Command::new(exe)
        .arg("demo-sender")
        .arg("--weights")
        .arg(&weights)
        .arg("--to")
        .arg(endpoint.to_string())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map(demo::SenderChild)
        .map_err(|e| anyhow::anyhow!("demo: cannot start the sender process: {e}"))?;
    Ok(Demo {
        endpoint,
        receiver,
        weights,
        sender,
        foreign,
    })
}

/// Run the dev mode until `shutdown` completes.
pub async fn run(args: DevArgs, shutdown: impl Future<Output = ()>) -> Result<(), anyhow::Error> {
    let mut problems = sov_common::config::Problems::default();
    sov_common::config::check_country(&mut problems, "--country", &args.country);
    if !problems.is_empty() {
        anyhow::bail!("{problems}");
    }
    let dir = absolute(&args.data_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let node = dev_node_name();
    let pki = crate::pki::ensure_dev(&dir.join("pki"), &node, DEFAULT_TRUST_DOMAIN)?;
    let mut collector_cfg = CollectorConfig::new(
        args.listen,
        dir.join("collector"),
        ServerTlsFiles {
            ca: pki.ca.clone(),
            cert: pki.collector.cert.clone(),
            key: pki.collector.key.clone(),
            revoked: None,
        },
    );
    collector_cfg.http.listen = Some(args.http_listen);
    let policy = match &args.policy {
        Some(p) => absolute(p),
        None => {
            let p = dir.join("policy.toml");
            std::fs::write(&p, dev_policy(&args.country))
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
            p
        }
    };
    crate::policy::Policy::load(&policy)
        .map_err(|e| anyhow::anyhow!("policy {}: {e}", policy.display()))?;
    collector_cfg.policy = Some(policy.clone());
    let include_loopback = args.include_loopback || args.demo;
    if include_loopback {
        // This host's own addresses are inside the declared country.
        for cidr in ["127.0.0.0/8", "::1/128"] {
            collector_cfg.geo.overrides.push(GeoOverride {
                cidr: cidr.to_owned(),
                country: args.country.clone(),
                asn: None,
                org: Some("this host (loopback)".to_owned()),
                operator_country: None,
            });
        }
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {e} (is another dev collector running? use --listen)",
                args.listen
            )
        })?;
    // The HTTPS listener is bound by the collector itself; check the port first so that the
    // message names the flag.
    drop(std::net::TcpListener::bind(args.http_listen).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {}: {e} (is another dev collector running? use --http-listen)",
            args.http_listen
        )
    })?);
    let stop = CancellationToken::new();
    let mut demo = if args.demo {
        Some(start_demo(&dir, &args.country, &mut collector_cfg, &stop).await?)
    } else {
        None
    };
    let url = format!("https://{}", args.listen);
    let mut weights = sov_agent::config::WeightsConfig::default();
    if demo.is_some() {
        let mut roots = sov_agent::collect::weights::discover::default_roots(
            &|k| std::env::var(k).ok(),
            Path::new("/"),
        );
        roots.push(dir.join("demo").join("hub"));
        weights.roots = Some(roots);
        weights.scan_interval_secs = 10;
    }
    let net = sov_agent::config::NetConfig {
        include_loopback,
        ..Default::default()
    };
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
        weights,
        net,
        metrics: Default::default(),
        training: Default::default(),
    };
    let problems = agent_cfg.validate();
    if !problems.is_empty() {
        anyhow::bail!("dev agent configuration is invalid:\n{problems}");
    }
    let store = Arc::new(SqliteStore::open(&collector_cfg.data_dir)?);
    let now = sov_common::clock::now_unix_ms();
    let (token, record) =
        crate::token::generate(Role::Regulator, "dev web page", now, DEV_TOKEN_LIFETIME_MS)?;
    store.insert_token(record).await?;
    let agent = sov_agent::Agent::open(agent_cfg)?;

    let web_host = if args.http_listen.ip().is_loopback() {
        format!("localhost:{}", args.http_listen.port())
    } else {
        args.http_listen.to_string()
    };
    let ctl = format!(
        "{SOVCTL_LINE_PREFIX}--collector {url} --ca {} --cert {} --key {} nodes",
        pki.ca.display(),
        pki.regulator.cert.display(),
        pki.regulator.key.display()
    );
    println!("Sovereign dev mode");
    println!("  collector   {url} (gRPC, mutual TLS)");
    println!("{WEB_LINE_LABEL}https://{web_host}/#token={token}");
    println!(
        "              (a regulator token for this run, valid 7 days; the certificate comes from the dev CA {}: your browser asks you to accept it)",
        pki.ca.display()
    );
    println!(
        "  database    {}",
        collector_cfg
            .data_dir
            .join(crate::store::sqlite::DB_FILE)
            .display()
    );
    println!(
        "  policy      {} (jurisdiction {}; reloaded when it changes)",
        policy.display(),
        args.country
    );
    println!("  pki         {}", dir.join("pki").display());
    println!(
        "  agent       node {node:?}, site {:?}, country {:?}, a report every {}s{}",
        args.site,
        args.country,
        args.interval_secs,
        if include_loopback {
            ", loopback traffic included"
        } else {
            " (loopback traffic left out: --include-loopback counts it)"
        }
    );
    println!("  spool       {}", dir.join("agent-spool").display());
    if let Some(d) = &demo {
        println!();
        println!(
            "DEMO (--demo): generated on this host to show what a breach looks like; not real traffic abroad"
        );
        println!(
            "  destination {} placed in {} by a [[geo.override]] (organisation \"{}\")",
            d.endpoint,
            d.foreign,
            demo::DEMO_ORG
        );
        println!(
            "  process     pid {} holds {} ({}/{}, restricted by the dev policy) and sends it there, {} KiB/s",
            d.sender.0.id(),
            d.weights.display(),
            demo::DEMO_ORG_ID,
            demo::DEMO_MODEL,
            demo::SEND_BYTES_PER_SEC / 1024
        );
        println!(
            "  alerts      http://{}/alerts (a webhook sink; each alert it receives is printed below)",
            d.receiver
        );
        println!(
            "  expect      a foreign-egress and a weights-exfiltration breach within about a minute"
        );
    }
    println!();
    println!("See what the collector knows (a regulator certificate is ready):");
    println!("{ctl}");
    println!("Replace `nodes` with `breaches`, `models`, `egress --by country` or `scorecard`.");
    println!();
    println!("Stop with Ctrl-C.");

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
    drop(demo.take());
    let agent_result = agent_task.await;
    served?;
    agent_result??;
    Ok(())
}
