//! `sovctl`: the regulators' command line. Connects with a client certificate and prints
//! answers as a table (default), JSON or CSV ([`sov_evidence::view`]); `sovctl verify` checks
//! an evidence report offline ([`sov_evidence::report::verify`]).
//!
//! Architecture invariant: sovctl speaks to the collector only through `sov-proto`'s Query
//! service; it links no database driver and no geolocation reader (`cargo tree -p sovctl`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;
use sov_common::clock::now_unix_ms;
use sov_common::error::source_chain;
use sov_common::tls::ClientTls;
use sov_evidence::audit::AuditRecord;
use sov_evidence::view::{
    self, AUDIT_COLUMNS, BREACH_COLUMNS, EgressBy, MODEL_COLUMNS, NODE_COLUMNS, POLICY_COLUMNS,
    SCORECARD_COLUMNS, breach_json, egress_json, model_json, model_row, node_json,
    parse_duration_ms, policy_rows, scorecard_rows,
};
use sov_proto::pb;
use sov_proto::pb::query_client::QueryClient;

/// Largest response sovctl decodes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Page size sovctl asks for.
const PAGE: u32 = 500;

/// Query a Sovereign collector.
#[derive(Debug, Parser)]
#[command(name = "sovctl", version)]
pub struct Cli {
    /// Collector URL.
    #[arg(
        long,
        global = true,
        env = "SOVCTL_COLLECTOR",
        default_value = "https://127.0.0.1:7443"
    )]
    collector: String,
    /// CA certificate that signed the collector's certificate.
    #[arg(long, global = true, env = "SOVCTL_CA")]
    ca: Option<PathBuf>,
    /// Your client certificate (role regulator or admin).
    #[arg(long, global = true, env = "SOVCTL_CERT")]
    cert: Option<PathBuf>,
    /// Your private key.
    #[arg(long, global = true, env = "SOVCTL_KEY")]
    key: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// A JSON array of objects.
    Json,
    /// RFC 4180 CSV with a header line.
    Csv,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every node: where it is, when it last reported, and whether reports are missing.
    Nodes,
    /// Every model whose weights reside somewhere: copies (node, site, country, path, storage)
    /// and the processes and GPUs using them.
    Models {
        /// Only models matching: an exact sha256, or part of the model name / repository id.
        query: Option<String>,
    },
    /// The model inventory as an AI bill of materials: CycloneDX 1.6 JSON, one
    /// machine-learning-model component per model with its SHA-256, format, parameters,
    /// provenance, and every copy and user as properties.
    Bom {
        /// Only models matching: an exact sha256, or part of the model name / repository id.
        query: Option<String>,
    },
    /// Training runs: processes that wrote weight files while mapping other weights or using
    /// a GPU, with node, country, pod, GPU-hours, inputs (base weights, datasets) and outputs
    /// (checkpoints), newest first.
    Training {
        /// Only runs active within this long ago: a number and a unit, s, m, h or d (e.g. 7d).
        #[arg(long, default_value = "30d", value_parser = parse_duration_ms)]
        since: i64,
    },
    /// Outbound bytes by destination country, node, process, ASN or destination.
    Egress {
        /// How far back: a number and a unit, s, m, h or d (e.g. 90m, 24h, 7d).
        #[arg(long, default_value = "24h", value_parser = parse_duration_ms)]
        since: i64,
        /// Grouping.
        #[arg(long, value_enum, default_value = "country")]
        by: By,
    },
    /// Breaches the collector's policy rules opened, newest first.
    Breaches {
        /// Which breaches: open, resolved or all.
        #[arg(long, value_enum, default_value = "all")]
        state: BreachStateArg,
        /// Only this rule (e.g. foreign-egress).
        #[arg(long)]
        rule: Option<String>,
        /// Only breaches on this node.
        #[arg(long)]
        node: Option<String>,
        /// Only breaches of at least this severity: info, warning or critical.
        #[arg(long)]
        min_severity: Option<String>,
        /// Only breaches open at some time within this long ago (e.g. 24h); default all.
        #[arg(long, value_parser = parse_duration_ms)]
        since: Option<i64>,
    },
    /// The audit log: every query a regulator or admin made (who, what, parameters, when,
    /// result size), oldest first, with its hash chain.
    Audit {
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Read the whole log and check its hash chain here; exit 1 when it is broken.
        #[arg(long)]
        verify: bool,
    },
    /// Export a signed evidence report (scorecard, breaches, breach-log segment with its
    /// hashes, geolocation databases) to a file.
    Report {
        /// How far back: a number and a unit, s, m, h or d (e.g. 30d).
        #[arg(long, default_value = "30d", value_parser = parse_duration_ms)]
        since: i64,
        /// json (the signed document itself) or html (a page embedding it).
        #[arg(long, value_enum, default_value = "json")]
        format: ReportFormat,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
        /// Jurisdiction (two letters) when the collector has no policy file.
        #[arg(long, default_value = "")]
        jurisdiction: String,
    },
    /// Check a report file offline: its signature, its breach-log chain, and that not one byte
    /// changed. Exit 0 only when all hold.
    Verify {
        /// The report (JSON or HTML).
        file: PathBuf,
        /// Also require the signing certificate to be issued by this CA (default: --ca when
        /// given, else any signer).
        #[arg(long = "issuer")]
        issuer: Option<PathBuf>,
    },
    /// The sovereignty scorecard: who holds the weights, where AI runs, where data flows,
    /// how complete the picture is.
    Scorecard {
        /// How far back: a number and a unit, s, m, h or d (e.g. 30d).
        #[arg(long, default_value = "30d", value_parser = parse_duration_ms)]
        since: i64,
        /// Jurisdiction (two letters) when the collector has no policy file.
        #[arg(long, default_value = "")]
        jurisdiction: String,
    },
    /// The jurisdiction policy in force (admins only): sites, model rules, allowed
    /// destinations with their reasons and expiry, thresholds.
    Policy,
}

/// `sovctl report --format`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ReportFormat {
    /// The signed JSON document.
    Json,
    /// A self-contained page embedding it.
    Html,
}

/// `sovctl breaches --state`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BreachStateArg {
    /// Still open.
    Open,
    /// Resolved.
    Resolved,
    /// Both.
    All,
}

/// `sovctl egress --by` (the grouping itself is [`EgressBy`]).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum By {
    /// Per destination country.
    Country,
    /// Per node and destination country.
    Node,
    /// Per node, process and destination country.
    Process,
    /// Per destination ASN.
    Asn,
    /// Per remote address and port.
    Destination,
    /// Per Kubernetes pod (namespace and name, on its node).
    Pod,
    /// Per Kubernetes namespace.
    Namespace,
    /// Per container image.
    Image,
    /// Per container (node, namespace, pod, container, id, image).
    Container,
}

impl From<By> for EgressBy {
    fn from(b: By) -> Self {
        match b {
            By::Country => Self::Country,
            By::Node => Self::Node,
            By::Process => Self::Process,
            By::Asn => Self::Asn,
            By::Destination => Self::Destination,
            By::Pod => Self::Pod,
            By::Namespace => Self::Namespace,
            By::Image => Self::Image,
            By::Container => Self::Container,
        }
    }
}

/// Render rows (JSON objects) in the chosen format over the given columns.
pub fn render(rows: &[Value], columns: &[&str], output: Output) -> String {
    match output {
        Output::Json => view::json(rows),
        Output::Csv => view::csv(rows, columns),
        Output::Table => view::table(rows, columns),
    }
}

fn need(v: Option<PathBuf>, flag: &str, env: &str) -> Result<PathBuf, String> {
    v.ok_or_else(|| format!("{flag} is required (or set {env})"))
}

/// `sovctl verify`: offline, no collector needed.
fn verify_file(file: &std::path::Path, issuer: Option<&std::path::Path>) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let ca = match issuer {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    sov_evidence::report::verify(&text, ca.as_deref())
        .map(|v| format!("{}: {}\n", file.display(), v.message()))
        .map_err(|e| format!("{}: {e}", file.display()))
}

async fn run(cli: Cli) -> Result<String, String> {
    if let Command::Verify { file, issuer } = &cli.command {
        let issuer = issuer.clone().or_else(|| cli.ca.clone());
        return verify_file(file, issuer.as_deref());
    }
    let ca = need(cli.ca, "--ca", "SOVCTL_CA")?;
    let cert = need(cli.cert, "--cert", "SOVCTL_CERT")?;
    let key = need(cli.key, "--key", "SOVCTL_KEY")?;
    let tls = ClientTls::load(&ca, &cert, &key, None)
        .map_err(|e| format!("{e}: {}", source_chain(&e)))?;
    let channel = tls
        .connect(&cli.collector)
        .await
        .map_err(|e| format!("{e}: {}", source_chain(&e)))?;
    let mut client = QueryClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
    match cli.command {
        Command::Nodes => {
            let nodes = fetch_nodes(&mut client)
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            let rows: Vec<Value> = nodes.iter().map(node_json).collect();
            Ok(render(&rows, &NODE_COLUMNS, cli.output))
        }
        Command::Models { query } => {
            let models = fetch_models(&mut client, query.as_deref().unwrap_or(""))
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            let rows: Vec<Value> = if cli.output == Output::Json {
                models.iter().map(model_json).collect()
            } else {
                models.iter().map(model_row).collect()
            };
            Ok(render(&rows, &MODEL_COLUMNS, cli.output))
        }
        Command::Bom { query } => {
            let models = fetch_models(&mut client, query.as_deref().unwrap_or(""))
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            let bom = sov_evidence::bom::cyclonedx(
                &models,
                now_unix_ms(),
                "sovctl",
                env!("CARGO_PKG_VERSION"),
            );
            Ok(format!(
                "{}\n",
                serde_json::to_string_pretty(&bom).map_err(|e| e.to_string())?
            ))
        }
        Command::Training { since } => {
            let resp = client
                .list_training(pb::ListTrainingRequest {
                    since_unix_ms: now_unix_ms() - since,
                    limit: PAGE,
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            if resp.truncated {
                eprintln!("sovctl: more runs not shown (narrow --since)");
            }
            let rows: Vec<Value> = if cli.output == Output::Json {
                resp.runs.iter().map(view::training_json).collect()
            } else {
                resp.runs.iter().map(view::training_row).collect()
            };
            Ok(render(&rows, &view::TRAINING_COLUMNS, cli.output))
        }
        Command::Egress { since, by } => {
            let by = EgressBy::from(by);
            let now = now_unix_ms();
            let resp = client
                .egress(pb::EgressRequest {
                    since_unix_ms: now - since,
                    until_unix_ms: 0,
                    by: by.as_str().to_owned(),
                    limit: PAGE,
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            if resp.from_unix_ms != 0 {
                eprintln!(
                    "sovctl: egress from {} to {}",
                    view::rfc3339(resp.from_unix_ms),
                    view::rfc3339(resp.until_unix_ms)
                );
            }
            if resp.truncated > 0 {
                eprintln!("sovctl: {} more rows not shown", resp.truncated);
            }
            let rows: Vec<Value> = if cli.output == Output::Json {
                resp.rows.iter().map(|r| egress_json(r, by)).collect()
            } else {
                resp.rows
                    .iter()
                    .map(|r| sov_evidence::view::egress_row(r, by))
                    .collect()
            };
            Ok(render(&rows, by.columns(), cli.output))
        }
        Command::Breaches {
            state,
            rule,
            since,
            node,
            min_severity,
        } => {
            let now = now_unix_ms();
            let state = match state {
                BreachStateArg::Open => "open",
                BreachStateArg::Resolved => "resolved",
                BreachStateArg::All => "",
            };
            let resp = client
                .list_breaches(pb::ListBreachesRequest {
                    state: state.to_owned(),
                    rule: rule.unwrap_or_default(),
                    since_unix_ms: since.map_or(0, |s| now - s),
                    limit: PAGE,
                    node: node.unwrap_or_default(),
                    min_severity: min_severity.unwrap_or_default(),
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            let rows: Vec<Value> = resp.breaches.iter().map(breach_json).collect();
            Ok(render(&rows, &BREACH_COLUMNS, cli.output))
        }
        Command::Audit { after, verify } => {
            let records = fetch_audit(&mut client, if verify { 0 } else { after })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            if verify {
                let mut v = sov_evidence::chain::ChainVerifier::new();
                for r in &records {
                    v.push(&r.as_log_record()).map_err(|e| {
                        format!("audit log broken at record {}: {}", e.seq, e.reason)
                    })?;
                }
                eprintln!(
                    "sovctl: audit log verified: {} records, last hash {}",
                    v.checked(),
                    v.last_hash()
                );
            }
            let rows: Vec<Value> = records
                .iter()
                .filter(|r| r.seq > after)
                .map(AuditRecord::to_json)
                .collect();
            Ok(render(&rows, &AUDIT_COLUMNS, cli.output))
        }
        Command::Verify { .. } => Err("verify runs offline".into()),
        Command::Report {
            since,
            format,
            out,
            jurisdiction,
        } => {
            let now = now_unix_ms();
            let resp = client
                .export_report(pb::ExportReportRequest {
                    since_unix_ms: now - since,
                    until_unix_ms: 0,
                    jurisdiction,
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            // Check what the collector sent before writing it.
            sov_evidence::report::verify(&resp.signed_json, None)
                .map_err(|e| format!("the collector's report does not verify: {e}"))?;
            let text = match format {
                ReportFormat::Json => resp.signed_json,
                ReportFormat::Html => sov_evidence::report::render_html(&resp.signed_json),
            };
            std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
            Ok(format!("report written to {}\n", out.display()))
        }
        Command::Scorecard {
            since,
            jurisdiction,
        } => {
            let now = now_unix_ms();
            let resp = client
                .scorecard(pb::ScorecardRequest {
                    since_unix_ms: now - since,
                    until_unix_ms: 0,
                    jurisdiction,
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            let card: Value = serde_json::from_str(&resp.scorecard_json)
                .map_err(|e| format!("the collector sent a scorecard that is not JSON: {e}"))?;
            if cli.output == Output::Json {
                return Ok(serde_json::to_string_pretty(&card).unwrap_or_default() + "\n");
            }
            Ok(render(
                &scorecard_rows(&card),
                &SCORECARD_COLUMNS,
                cli.output,
            ))
        }
        Command::Policy => {
            let resp = client
                .get_policy(pb::GetPolicyRequest {})
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            let policy: Value = serde_json::from_str(&resp.policy_json)
                .map_err(|e| format!("the collector sent a policy that is not JSON: {e}"))?;
            if cli.output == Output::Json {
                return Ok(serde_json::to_string_pretty(&policy).unwrap_or_default() + "\n");
            }
            Ok(render(&policy_rows(&policy), &POLICY_COLUMNS, cli.output))
        }
    }
}

/// A page cursor: where the next page starts, and when reading stops.
trait Cursor: Clone {
    /// Reading stops at this cursor after `prev`: the end (empty, 0) or no progress.
    fn ends(&self, prev: &Self) -> bool;
}

impl Cursor for String {
    fn ends(&self, prev: &Self) -> bool {
        self.is_empty() || self == prev
    }
}

impl Cursor for u64 {
    fn ends(&self, prev: &Self) -> bool {
        *self == 0 || self <= prev
    }
}

/// Every row of a paged listing, from the cursor `start`: `page(after)` reads one page and
/// gives its rows and the next cursor; reading stops at the last page or after `max` rows.
async fn fetch_all<T, K, F, Fut>(start: K, max: usize, mut page: F) -> Result<Vec<T>, tonic::Status>
where
    K: Cursor,
    F: FnMut(K) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, K), tonic::Status>>,
{
    let mut all = Vec::new();
    let mut after = start;
    loop {
        let (rows, next) = page(after.clone()).await?;
        all.extend(rows);
        if next.ends(&after) || all.len() >= max {
            return Ok(all);
        }
        after = next;
    }
}

/// Fetch every node, page by page.
pub async fn fetch_nodes(
    client: &mut QueryClient<tonic::transport::Channel>,
) -> Result<Vec<pb::NodeSummary>, tonic::Status> {
    fetch_all(String::new(), usize::MAX, |after| {
        let mut client = client.clone();
        async move {
            let page = client
                .list_nodes(pb::ListNodesRequest { limit: PAGE, after })
                .await?
                .into_inner();
            Ok((page.nodes, page.next_after))
        }
    })
    .await
}

/// Fetch every model matching `query`, page by page.
pub async fn fetch_models(
    client: &mut QueryClient<tonic::transport::Channel>,
    query: &str,
) -> Result<Vec<pb::ModelSummary>, tonic::Status> {
    fetch_all(String::new(), usize::MAX, |after| {
        let mut client = client.clone();
        let query = query.to_owned();
        async move {
            let page = client
                .list_models(pb::ListModelsRequest {
                    query,
                    limit: PAGE,
                    after,
                })
                .await?
                .into_inner();
            Ok((page.models, page.next_after))
        }
    })
    .await
}

/// Largest audit log sovctl reads in one command.
const MAX_AUDIT_RECORDS: usize = 1_000_000;

/// Fetch the audit log after `after`, page by page.
pub async fn fetch_audit(
    client: &mut QueryClient<tonic::transport::Channel>,
    after: u64,
) -> Result<Vec<AuditRecord>, tonic::Status> {
    fetch_all(after, MAX_AUDIT_RECORDS, |after_seq| {
        let mut client = client.clone();
        async move {
            let page = client
                .list_audit(pb::ListAuditRequest {
                    after_seq,
                    limit: PAGE,
                })
                .await?
                .into_inner();
            let records = page.records.into_iter().map(AuditRecord::from).collect();
            Ok((records, page.next_after_seq))
        }
    })
    .await
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sovctl: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(text) => sov_common::cli::print_stdout(&text),
        Err(e) => {
            eprintln!("sovctl: {e}");
            ExitCode::FAILURE
        }
    }
}
