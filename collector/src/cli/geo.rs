//! `sov-collector geo lookup [--config FILE] [--output json] IP...`: the verdict of each
//! address, as the collector would give it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use sov_common::cli::print_stdout;
use sov_common::config::EXIT_BAD_CONFIG;

use crate::config::CollectorConfig;
use crate::geo::{Geo, Verdict};

#[derive(Debug, Subcommand)]
pub enum GeoCommand {
    /// Print the country, ASN, organisation and source of each address.
    Lookup {
        /// Collector configuration whose [geo] section to use (default: the embedded table).
        #[arg(long, short, env = "SOV_COLLECTOR_CONFIG")]
        config: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        output: GeoOutput,
        /// Addresses (IPv4 or IPv6).
        #[arg(required = true)]
        ips: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum GeoOutput {
    Table,
    Json,
}

/// Run one `geo` command.
pub(super) fn run(command: GeoCommand) -> ExitCode {
    match command {
        GeoCommand::Lookup {
            config,
            output,
            ips,
        } => match lookup_command(config.as_deref(), &ips, output == GeoOutput::Json) {
            Ok(text) => print_stdout(&text),
            Err(e) => {
                eprintln!("sov-collector: {e}");
                ExitCode::from(EXIT_BAD_CONFIG as u8)
            }
        },
    }
}

/// One line of JSON output.
#[derive(Debug, serde::Serialize)]
struct Row<'a> {
    ip: String,
    country: &'a str,
    asn: Option<u32>,
    org: &'a str,
    source: &'a str,
    answers: &'a [crate::geo::Answer],
    contested: bool,
    operator_country: &'a str,
}

/// The text to print for `ips`: one line per address (`--output text`), or a JSON array of
/// `{ip, country, asn, org, source, answers, contested, operator_country}` objects. With `config`, its `[geo]` section decides
/// (read as strictly as `serve` reads it); without, the embedded table alone. Every address
/// that does not parse is named in the error, and nothing is looked up.
pub fn lookup_command(config: Option<&Path>, ips: &[String], json: bool) -> Result<String, String> {
    let mut parsed = Vec::with_capacity(ips.len());
    let mut bad = Vec::new();
    for text in ips {
        match text.trim().parse::<IpAddr>() {
            Ok(ip) => parsed.push(ip),
            Err(_) => bad.push(format!("{text:?}")),
        }
    }
    if !bad.is_empty() {
        return Err(format!("not an IP address: {}", bad.join(", ")));
    }
    let geo = match config {
        Some(path) => {
            let cfg = sov_common::config::read_toml::<CollectorConfig>(path)
                .map_err(|e| sov_common::error::error_line(&e))?;
            Geo::from_config(&cfg.geo).map_err(|e| sov_common::error::error_line(&e))?
        }
        None => Geo::embedded_only(),
    };
    let verdicts: Vec<(IpAddr, std::sync::Arc<Verdict>)> =
        parsed.iter().map(|ip| (*ip, geo.lookup(*ip))).collect();
    if json {
        let rows: Vec<Row<'_>> = verdicts
            .iter()
            .map(|(ip, v)| Row {
                ip: ip.to_string(),
                country: &v.country,
                asn: v.asn,
                org: &v.org,
                source: &v.source,
                answers: &v.answers,
                contested: v.contested,
                operator_country: &v.operator_country,
            })
            .collect();
        return serde_json::to_string_pretty(&rows).map_err(|e| e.to_string());
    }
    let width = verdicts
        .iter()
        .map(|(ip, _)| ip.to_string().len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (ip, v) in &verdicts {
        out.push_str(&text_line(&ip.to_string(), width, v));
        out.push('\n');
    }
    Ok(out)
}

/// `8.8.8.8  country=US asn=15169 org="GOOGLE" source=embedded:iptocc-1.4.175`; unknown
/// values are `-`; the ASN's source is added when it differs, the operator's country when
/// known, and every answer side by side when the sources disagree
/// (`contested=[US:embedded:iptocc-1.4.175, FR:mmdb:…]`).
fn text_line(ip: &str, width: usize, v: &Verdict) -> String {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let mut line = format!(
        "{ip:<width$}  country={} asn={} org={} source={}",
        dash(&v.country),
        v.asn.map_or_else(|| "-".to_owned(), |a| a.to_string()),
        if v.org.is_empty() {
            "-".to_owned()
        } else {
            format!("{:?}", v.org)
        },
        dash(&v.source),
    );
    if !v.asn_source.is_empty() && v.asn_source != v.source {
        line.push_str(&format!(" asn_source={}", v.asn_source));
    }
    if !v.operator_country.is_empty() {
        line.push_str(&format!(" operator={}", v.operator_country));
    }
    if v.contested {
        let answers: Vec<String> = v
            .answers
            .iter()
            .map(|a| format!("{}:{}", a.country, a.source))
            .collect();
        line.push_str(&format!(" contested=[{}]", answers.join(", ")));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_config_the_embedded_table_answers_one_line_per_address() {
        let out = lookup_command(None, &["8.8.8.8".into(), "10.0.0.1".into()], false).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(
            lines[0].starts_with("8.8.8.8 ") && lines[0].contains("country=US"),
            "{out}"
        );
        assert!(lines[0].contains("source=embedded:iptocc-"), "{out}");
        assert!(lines[1].contains("country=- asn=- org=- source=-"), "{out}");
    }

    #[test]
    fn sources_that_disagree_are_shown_side_by_side_with_the_operators_country() {
        let dir = tempfile::tempdir().unwrap();
        let feed = dir.path().join("cloud.geofeed.csv");
        std::fs::write(&feed, "8.8.8.0/24,FR,FR-IDF,Paris,\n").unwrap();
        let delegated = dir.path().join("delegated-arin-extended-latest");
        std::fs::write(&delegated, "arin|US|asn|15169|1|20000101|assigned|x\n").unwrap();
        let cfg = dir.path().join("collector.toml");
        std::fs::write(
            &cfg,
            format!(
                "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[geo]\ndatabases = [{feed:?}, {delegated:?}]\n\
                 [[geo.override]]\ncidr = \"8.8.4.0/24\"\ncountry = \"US\"\nasn = 15169\n"
            ),
        )
        .unwrap();
        let out = lookup_command(Some(&cfg), &["8.8.8.8".into(), "8.8.4.4".into()], false).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].contains("country=FR"), "{out}");
        assert!(
            lines[0].contains("contested=[FR:geofeed:cloud.geofeed.csv@")
                && lines[0].contains(", US:embedded:iptocc-"),
            "{out}"
        );
        // The override's ASN's holder is registered in the US (the delegated file).
        assert!(
            lines[1].contains("operator=US") && !lines[1].contains("contested"),
            "{out}"
        );
    }

    #[test]
    fn json_output_is_an_array_of_objects_with_the_documented_keys() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("collector.toml");
        std::fs::write(
            &cfg,
            "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
             [[geo.override]]\ncidr = \"10.0.0.0/8\"\ncountry = \"FR\"\nasn = 64500\norg = \"Acme, SA\"\n",
        )
        .unwrap();
        let out = lookup_command(
            Some(&cfg),
            &["10.1.2.3".into(), "::ffff:8.8.8.8".into()],
            true,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let rows = v.as_array().unwrap();
        assert_eq!(rows.len(), 2);
        let keys: Vec<&str> = rows[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 8);
        for k in [
            "ip",
            "country",
            "asn",
            "org",
            "source",
            "answers",
            "contested",
            "operator_country",
        ] {
            assert!(keys.contains(&k), "{keys:?}");
        }
        assert_eq!(rows[0]["country"], "FR");
        assert_eq!(rows[0]["asn"], 64500);
        assert_eq!(rows[0]["org"], "Acme, SA");
        assert_eq!(rows[0]["source"], "override:10.0.0.0/8");
        assert_eq!(rows[1]["ip"], "::ffff:8.8.8.8");
        assert_eq!(rows[1]["country"], "US");
        assert_eq!(rows[1]["asn"], serde_json::Value::Null);
    }

    #[test]
    fn bad_addresses_and_bad_configs_are_errors_naming_them() {
        let e = lookup_command(
            None,
            &["8.8.8.8".into(), "8.8.8".into(), "nope".into()],
            false,
        )
        .unwrap_err();
        assert!(e.contains("\"8.8.8\"") && e.contains("\"nope\""), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("collector.toml");
        std::fs::write(
            &cfg,
            "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[geo]\ndatabses = []\n",
        )
        .unwrap();
        let e = lookup_command(Some(&cfg), &["8.8.8.8".into()], false).unwrap_err();
        assert!(e.contains("databses"), "{e}");
        std::fs::write(
            &cfg,
            "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[geo]\ndatabases = [\"/no/such.mmdb\"]\n",
        )
        .unwrap();
        let e = lookup_command(Some(&cfg), &["8.8.8.8".into()], false).unwrap_err();
        assert!(e.contains("/no/such.mmdb"), "{e}");
    }
}
