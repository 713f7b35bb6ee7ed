//! `sovctl`: the regulators' command line. Connects with a client certificate and prints
//! answers as a table (default), JSON or CSV.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use sov_common::error::source_chain;
use sov_common::tls::ClientTls;
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
    /// Outbound bytes by destination country, node, process, ASN or destination.
    Egress {
        /// How far back: a number and a unit, s, m, h or d (e.g. 90m, 24h, 7d).
        #[arg(long, default_value = "24h", value_parser = parse_duration_ms)]
        since: i64,
        /// Grouping.
        #[arg(long, value_enum, default_value = "country")]
        by: EgressBy,
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

/// The columns of `sovctl policy` as a table or CSV (JSON prints the whole object).
pub const POLICY_COLUMNS: [&str; 3] = ["section", "item", "value"];

/// The policy as rows of `section`, `item`, `value`.
pub fn policy_rows(p: &Value) -> Vec<Value> {
    let row = |section: &str, item: String, value: String| serde_json::json!({"section": section, "item": item, "value": value});
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut rows = vec![
        row("policy", "file".into(), text(&p["file"])),
        row("policy", "jurisdiction".into(), text(&p["jurisdiction"])),
        row("policy", "inside".into(), text(&p["inside"])),
    ];
    for (site, country) in p["sites"].as_object().into_iter().flatten() {
        rows.push(row("site", site.clone(), text(country)));
    }
    for m in p["models"].as_array().into_iter().flatten() {
        rows.push(row("model", text(&m["match"]), text(&m["class"])));
    }
    for a in p["allow"].as_array().into_iter().flatten() {
        let expires = match &a["expires"] {
            Value::Null => "never".to_owned(),
            e => text(e),
        };
        let state = if a["active"] == true {
            "active"
        } else {
            "expired"
        };
        rows.push(row(
            "allow",
            text(&a["target"]),
            format!("{} (expires {expires}, {state})", text(&a["reason"])),
        ));
    }
    for (k, v) in p["thresholds"].as_object().into_iter().flatten() {
        rows.push(row("threshold", k.clone(), text(v)));
    }
    for w in p["warnings"].as_array().into_iter().flatten() {
        rows.push(row("warning", String::new(), text(w)));
    }
    rows
}

/// The columns of `sovctl audit`, in order; the JSON objects carry at least these keys.
pub const AUDIT_COLUMNS: [&str; 9] = [
    "seq", "at", "who", "role", "via", "call", "rows", "outcome", "hash",
];

/// The columns of `sovctl scorecard` as a table or CSV (JSON prints the whole object).
pub const SCORECARD_COLUMNS: [&str; 3] = ["question", "measure", "value"];

/// The scorecard's headline numbers as rows of `question`, `measure`, `value`.
pub fn scorecard_rows(s: &Value) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut add = |q: &str, m: &str, v: &Value| {
        rows.push(json!({"question": q, "measure": m, "value": v}));
    };
    add("scope", "jurisdiction", &s["jurisdiction"]);
    add("scope", "since", &s["since"]);
    add("scope", "until", &s["until"]);
    let w = &s["weights"];
    for k in [
        "models",
        "copies",
        "copies_inside",
        "copies_outside",
        "share_outside",
    ] {
        add("who holds the weights", k, &w[k]);
    }
    for o in w["by_origin"].as_array().into_iter().flatten() {
        add(
            "who holds the weights",
            &format!("copies of {} models", o["origin"].as_str().unwrap_or("")),
            &o["copies"],
        );
    }
    let c = &s["compute"];
    for k in ["gpu_hours", "gpu_hours_inside", "gpu_hours_outside"] {
        add("where AI runs", k, &c[k]);
    }
    for o in c["by_model_origin"].as_array().into_iter().flatten() {
        add(
            "where AI runs",
            &format!("gpu_hours on {} models", o["origin"].as_str().unwrap_or("")),
            &o["gpu_hours"],
        );
    }
    let d = &s["data"];
    for k in [
        "bytes_sent",
        "bytes_sent_outside",
        "bytes_sent_unplaced",
        "share_leaving",
    ] {
        add("where data flows", k, &d[k]);
    }
    for o in d["by_country"].as_array().into_iter().flatten() {
        add(
            "where data flows",
            &format!("bytes_sent to {}", o["country"].as_str().unwrap_or("")),
            &o["bytes_sent"],
        );
    }
    let p = &s["completeness"];
    for k in [
        "nodes",
        "nodes_reporting",
        "missing_reports",
        "dropped_reports",
    ] {
        add("how complete", k, &p[k]);
    }
    add(
        "how complete",
        "silent_nodes",
        &json!(p["silent_nodes"].as_array().map_or(0, Vec::len)),
    );
    rows
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

/// The columns of `sovctl breaches`, in order; the JSON objects carry at least these keys.
pub const BREACH_COLUMNS: [&str; 8] = [
    "breach_id",
    "rule",
    "state",
    "severity",
    "node",
    "subject",
    "opened_at",
    "resolved_at",
];

/// One breach as the JSON object `sovctl breaches --output json` prints (times RFC 3339,
/// `resolved_at` null while open; `evidence` parsed back into JSON).
pub fn breach_json(b: &pb::BreachSummary) -> Value {
    json!({
        "breach_id": b.breach_id,
        "rule": b.rule,
        "state": b.state,
        "severity": b.severity,
        "node": b.node,
        "subject": b.subject,
        "opened_at": rfc3339(b.opened_at_unix_ms),
        "last_seen": rfc3339(b.last_seen_unix_ms),
        "resolved_at": if b.resolved_at_unix_ms > 0 {
            Value::String(rfc3339(b.resolved_at_unix_ms))
        } else {
            Value::Null
        },
        "count": b.count,
        "evidence": serde_json::from_str::<Value>(&b.evidence_json).unwrap_or(Value::Null),
    })
}

/// Groupings of `sovctl egress`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum EgressBy {
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
}

impl EgressBy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Country => "country",
            Self::Node => "node",
            Self::Process => "process",
            Self::Asn => "asn",
            Self::Destination => "destination",
        }
    }

    fn columns(self) -> &'static [&'static str] {
        match self {
            Self::Country => &[
                "country",
                "bytes_sent",
                "bytes_received",
                "connections",
                "min_rtt_ms",
            ],
            Self::Node => &[
                "node",
                "country",
                "bytes_sent",
                "bytes_received",
                "connections",
                "min_rtt_ms",
            ],
            Self::Process => &[
                "node",
                "process",
                "pid",
                "country",
                "bytes_sent",
                "bytes_received",
                "connections",
                "min_rtt_ms",
            ],
            Self::Asn => &[
                "asn",
                "org",
                "country",
                "bytes_sent",
                "bytes_received",
                "connections",
                "min_rtt_ms",
            ],
            Self::Destination => &[
                "remote_address",
                "remote_port",
                "country",
                "asn",
                "org",
                "bytes_sent",
                "bytes_received",
                "min_rtt_ms",
                "geo_source",
            ],
        }
    }
}

/// "90m", "24h", "7d", "30s" → milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: i64 = num.parse().map_err(|_| {
        format!("{text:?} is not a duration: use a number and s, m, h or d (e.g. 7d)")
    })?;
    let per = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" | "" => 86_400_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use s, m, h or d"
            ));
        }
    };
    n.checked_mul(per)
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("{text:?} is out of range"))
}

/// One egress row as JSON.
pub fn egress_json(r: &pb::EgressRow, by: EgressBy) -> Value {
    let mut v = json!({
        "country": r.country,
        "bytes_sent": r.bytes_sent,
        "bytes_received": r.bytes_received,
        "connections": r.connections,
        "min_rtt_ms": (r.min_rtt_us > 0).then(|| f64::from(r.min_rtt_us) / 1000.0),
    });
    match by {
        EgressBy::Country => {}
        EgressBy::Node => v["node"] = json!(r.node),
        EgressBy::Process => {
            v["node"] = json!(r.node);
            v["process"] = json!(r.process);
            v["pid"] = json!(r.pid);
        }
        EgressBy::Asn => {
            v["asn"] = json!(r.asn);
            v["org"] = json!(r.org);
        }
        EgressBy::Destination => {
            v["remote_address"] = json!(r.remote_address);
            v["remote_port"] = json!(r.remote_port);
            v["asn"] = json!(r.asn);
            v["org"] = json!(r.org);
            v["geo_source"] = json!(r.geo_source);
        }
    }
    v
}

/// Columns of `sovctl models` as a table or CSV.
pub const MODEL_COLUMNS: [&str; 9] = [
    "model",
    "format",
    "sha256",
    "size",
    "params",
    "copies",
    "countries",
    "users",
    "revision",
];

/// One model as the JSON object `sovctl models --output json` prints.
pub fn model_json(m: &pb::ModelSummary) -> Value {
    let mut countries: Vec<&str> = m.copies.iter().map(|c| c.country.as_str()).collect();
    countries.sort_unstable();
    countries.dedup();
    json!({
        "model": m.model,
        "identity_source": m.identity_source,
        "format": m.format,
        "sha256": m.sha256,
        "size": m.size_bytes,
        "params": (m.parameter_count > 0).then_some(m.parameter_count),
        "revision": m.revision,
        "repo_path": m.repo_path,
        "publisher": m.publisher,
        "copies": m.copies.iter().map(|c| json!({
            "node": c.node,
            "site": c.site,
            "country": c.country,
            "path": c.path,
            "storage": c.storage,
            "server": c.server,
            "mount_point": c.mount_point,
            "first_seen": rfc3339(c.first_seen_unix_ms),
            "last_seen": rfc3339(c.last_seen_unix_ms),
        })).collect::<Vec<_>>(),
        "users": m.users.iter().map(|u| json!({
            "node": u.node,
            "pid": u.pid,
            "process": u.process,
            "gpus": u.gpus,
            "path": u.path,
        })).collect::<Vec<_>>(),
        "countries": countries.join(" "),
    })
}

/// A model row flattened for tables and CSV (counts instead of arrays, short sha).
fn model_row(m: &pb::ModelSummary) -> Value {
    let mut v = model_json(m);
    v["copies"] = json!(m.copies.len());
    v["users"] = json!(m.users.len());
    if let Some(short) = m.sha256.get(..12) {
        v["sha256"] = json!(short);
    }
    v
}

/// Fetch every model matching `query`, page by page.
pub async fn fetch_models(
    client: &mut QueryClient<tonic::transport::Channel>,
    query: &str,
) -> Result<Vec<pb::ModelSummary>, tonic::Status> {
    let mut all = Vec::new();
    let mut after = String::new();
    loop {
        let page = client
            .list_models(pb::ListModelsRequest {
                query: query.to_owned(),
                limit: PAGE,
                after: after.clone(),
            })
            .await?
            .into_inner();
        all.extend(page.models);
        if page.next_after.is_empty() || page.next_after == after {
            return Ok(all);
        }
        after = page.next_after;
    }
}

/// RFC 3339 UTC text of a Unix millisecond time ("" for 0).
pub fn rfc3339(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return String::new();
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The columns of `sovctl nodes`, in order; the JSON objects carry at least these keys.
pub const NODE_COLUMNS: [&str; 14] = [
    "node",
    "site",
    "country",
    "last_seen",
    "reports",
    "last_seq",
    "missing",
    "dropped",
    "cpu_percent",
    "memory_percent",
    "gpus",
    "gpu_util_percent",
    "gpu_state",
    "agent_version",
];

/// One node as the JSON object `sovctl nodes --output json` prints.
pub fn node_json(n: &pb::NodeSummary) -> Value {
    let mem_pct = if n.memory_total_bytes > 0 {
        (n.memory_used_bytes as f64) * 100.0 / (n.memory_total_bytes as f64)
    } else {
        0.0
    };
    json!({
        "node": n.node,
        "site": n.site,
        "country": n.country,
        "last_seen": rfc3339(n.last_seen_unix_ms),
        "reports": n.reports,
        "last_seq": n.last_seq,
        "missing": n.missing,
        "dropped": n.dropped,
        "epoch": n.epoch,
        "cpu_percent": (f64::from(n.cpu_percent) * 10.0).round() / 10.0,
        "memory_percent": (mem_pct * 10.0).round() / 10.0,
        "agent_version": n.agent_version,
        "gpus": n.gpu_count,
        "gpu_util_percent": (f64::from(n.gpu_util_percent) * 10.0).round() / 10.0,
        "gpu_state": n.gpu_state,
        "gpu_memory_used_bytes": n.gpu_memory_used_bytes,
        "gpu_memory_total_bytes": n.gpu_memory_total_bytes,
        "memory_used_bytes": n.memory_used_bytes,
        "memory_total_bytes": n.memory_total_bytes,
        "hostname": n.hostname,
        "epochs": n.epochs,
        "conflicts": n.conflicts,
        "labels": n.labels,
    })
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Render rows (JSON objects) in the chosen format over the given columns.
pub fn render(rows: &[Value], columns: &[&str], output: Output) -> String {
    match output {
        Output::Json => serde_json::to_string_pretty(rows).unwrap_or_else(|_| "[]".into()) + "\n",
        Output::Csv => {
            let mut out = columns.join(",") + "\n";
            for r in rows {
                let line: Vec<String> = columns.iter().map(|c| csv_field(&cell(&r[*c]))).collect();
                out.push_str(&line.join(","));
                out.push('\n');
            }
            out
        }
        Output::Table => {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
                .collect();
            let widths: Vec<usize> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    cells
                        .iter()
                        .map(|r| r[i].chars().count())
                        .max()
                        .unwrap_or(0)
                        .max(c.len())
                })
                .collect();
            let mut out = String::new();
            let line = |vals: Vec<&str>, out: &mut String| {
                let parts: Vec<String> = vals
                    .iter()
                    .zip(&widths)
                    .map(|(v, w)| format!("{v:<w$}"))
                    .collect();
                out.push_str(parts.join("  ").trim_end());
                out.push('\n');
            };
            line(
                columns
                    .iter()
                    .map(|c| c.to_uppercase())
                    .collect::<Vec<_>>()
                    .iter()
                    .map(String::as_str)
                    .collect(),
                &mut out,
            );
            for r in &cells {
                line(r.iter().map(String::as_str).collect(), &mut out);
            }
            out
        }
    }
}

/// Fetch every node, page by page.
pub async fn fetch_nodes(
    client: &mut QueryClient<tonic::transport::Channel>,
) -> Result<Vec<pb::NodeSummary>, tonic::Status> {
    let mut all = Vec::new();
    let mut after = String::new();
    loop {
        let page = client
            .list_nodes(pb::ListNodesRequest {
                limit: PAGE,
                after: after.clone(),
            })
            .await?
            .into_inner();
        all.extend(page.nodes);
        if page.next_after.is_empty() || page.next_after == after {
            return Ok(all);
        }
        after = page.next_after;
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
    crate::report::verify(&text, ca.as_deref())
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
        Command::Egress { since, by } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0);
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
            if resp.truncated > 0 {
                eprintln!("sovctl: {} more rows not shown", resp.truncated);
            }
            let rows: Vec<Value> = resp.rows.iter().map(|r| egress_json(r, by)).collect();
            Ok(render(&rows, by.columns(), cli.output))
        }
        Command::Breaches {
            state,
            rule,
            since,
            node,
            min_severity,
        } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0);
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
                let mut v = crate::breach::ChainVerifier::new();
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
                .map(crate::audit::AuditRecord::to_json)
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
            let now = sov_common::clock::now_unix_ms();
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
            crate::report::verify(&resp.signed_json, None)
                .map_err(|e| format!("the collector's report does not verify: {e}"))?;
            let text = match format {
                ReportFormat::Json => resp.signed_json,
                ReportFormat::Html => crate::report::render_html(&resp.signed_json),
            };
            std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
            Ok(format!("report written to {}\n", out.display()))
        }
        Command::Scorecard {
            since,
            jurisdiction,
        } => {
            let now = sov_common::clock::now_unix_ms();
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

/// Largest audit log sovctl reads in one command.
const MAX_AUDIT_RECORDS: usize = 1_000_000;

/// Fetch the audit log after `after`, page by page.
pub async fn fetch_audit(
    client: &mut QueryClient<tonic::transport::Channel>,
    after: u64,
) -> Result<Vec<crate::audit::AuditRecord>, tonic::Status> {
    let mut all = Vec::new();
    let mut after = after;
    loop {
        let page = client
            .list_audit(pb::ListAuditRequest {
                after_seq: after,
                limit: PAGE,
            })
            .await?
            .into_inner();
        all.extend(
            page.records
                .into_iter()
                .map(crate::audit::AuditRecord::from),
        );
        if page.next_after_seq == 0
            || page.next_after_seq <= after
            || all.len() >= MAX_AUDIT_RECORDS
        {
            return Ok(all);
        }
        after = page.next_after_seq;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_table_has_one_row_per_site_model_allow_entry_and_threshold() {
        let p = serde_json::json!({
            "file": "/etc/sovereign/policy.toml",
            "jurisdiction": "MA",
            "inside": ["MA"],
            "sites": {"paris": "FR"},
            "models": [{"match": "acme/*", "class": "restricted"}],
            "allow": [{"target": {"asn": 64500}, "reason": "cdn", "expires": null, "active": true}],
            "thresholds": {"window_secs": 300},
            "warnings": [],
        });
        let rows = policy_rows(&p);
        let find = |section: &str| rows.iter().find(|r| r["section"] == section).unwrap();
        assert_eq!(find("site")["item"], "paris");
        assert_eq!(find("model")["value"], "restricted");
        assert_eq!(find("allow")["value"], "cdn (expires never, active)");
        assert_eq!(find("threshold")["value"], "300");
        assert_eq!(rows.len(), 3 + 1 + 1 + 1 + 1);
    }

    fn sample() -> pb::NodeSummary {
        pb::NodeSummary {
            node: "node-a".into(),
            site: "rabat, dc1".into(),
            country: "MA".into(),
            last_seen_unix_ms: 1_700_000_000_000,
            reports: 10,
            last_seq: 12,
            missing: 2,
            memory_used_bytes: 1,
            memory_total_bytes: 4,
            ..Default::default()
        }
    }

    #[test]
    fn durations_take_seconds_minutes_hours_and_days() {
        assert_eq!(parse_duration_ms("7d"), Ok(7 * 86_400_000));
        assert_eq!(parse_duration_ms("90m"), Ok(90 * 60_000));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert!(
            parse_duration_ms("7w")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_duration_ms("x").is_err());
        assert!(parse_duration_ms("0h").is_err());
    }

    #[test]
    fn json_objects_carry_the_documented_keys() {
        let v = node_json(&sample());
        for k in [
            "node",
            "site",
            "country",
            "last_seen",
            "reports",
            "last_seq",
            "missing",
        ] {
            assert!(v.get(k).is_some(), "missing key {k}");
        }
        assert_eq!(v["last_seen"], "2023-11-14T22:13:20Z");
        assert_eq!(v["missing"], 2);
        assert_eq!(v["memory_percent"], 25.0);
    }

    #[test]
    fn csv_quotes_fields_with_commas_and_tables_align() {
        let rows = vec![node_json(&sample())];
        let csv = render(&rows, &NODE_COLUMNS, Output::Csv);
        let mut lines = csv.lines();
        assert_eq!(lines.next().unwrap(), NODE_COLUMNS.join(","));
        assert!(
            lines
                .next()
                .unwrap()
                .starts_with("node-a,\"rabat, dc1\",MA,"),
            "{csv}"
        );
        let table = render(&rows, &["node", "missing"], Output::Table);
        assert_eq!(table, "NODE    MISSING\nnode-a  2\n");
    }
}
