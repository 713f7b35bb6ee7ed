//! Signed evidence reports: what the collector knew over a time range, signed with its key,
//! checkable offline by anyone (`sovctl verify FILE`).
//!
//! A report is one JSON document, written in canonical form ([`canonical_json`]: sorted keys,
//! no spaces) followed by one newline:
//!
//! ```text
//! {"format":"sovereign.report.v1","report":{...},"signature":{"algorithm":"ecdsa-p256-sha256","certificate_pem":"...","value":"<hex DER signature>"}}
//! ```
//!
//! `report` holds the scorecard, the breaches of the range, the breach-log segment of the range
//! with its hashes, the geolocation database builds in use, who asked and when. The signature
//! is ECDSA P-256 / SHA-256 by the collector's TLS key over `"sovereign.report.v1\n"` followed
//! by the canonical JSON of `{"certificate_pem": ..., "report": ...}`: the certificate travels
//! with it and is covered too. [`verify`] checks that
//! the file is exactly in canonical form (so a changed byte anywhere, even a space, fails), the
//! signature, the breach-log segment's chain (each record's hash, and each record linking to
//! the one before), and, given the CA, that the certificate was issued by it.
//!
//! The HTML form ([`render_html`]) is a page rendered deterministically from the signed JSON,
//! which it embeds; verifying it checks the embedded JSON as above and that the page is exactly
//! the rendering of it, so the human-readable part cannot be altered either.

use std::fmt::Write as _;

use ring::signature::{self, KeyPair as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use crate::chain::{GENESIS_HASH, LogRecord, canonical_json};

/// The `format` of a report.
pub const FORMAT: &str = "sovereign.report.v1";
/// The signature algorithm's name in a report.
pub const ALGORITHM: &str = "ecdsa-p256-sha256";
/// What the signature covers, before the report's canonical JSON.
const SIGNED_PREFIX: &str = "sovereign.report.v1\n";
/// Marks the embedded JSON in the HTML form.
const EMBED_OPEN: &str = "<script type=\"application/json\" id=\"sovereign-report\">";
const EMBED_CLOSE: &str = "</script>";

/// Why a report could not be made or does not verify.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A key or certificate file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The collector's key cannot sign reports.
    #[error("the collector key cannot sign reports: {0}")]
    Key(String),
    /// The file is not a report, or is not exactly as signed.
    #[error("not a valid report: {0}")]
    Malformed(String),
    /// The signature does not match the report.
    #[error("signature does not match the report: the report was altered or signed by another key")]
    BadSignature,
    /// The breach-log segment's chain is broken.
    #[error("breach log segment broken at record {seq}: {reason}")]
    Chain {
        /// The first bad record.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// The certificate was not issued by the given CA.
    #[error("the signing certificate was not issued by the given CA: {0}")]
    NotFromCa(String),
}

/// Signs reports with the collector's key (ECDSA P-256, PKCS#8 PEM as `pki` writes it).
#[derive(Debug)]
pub struct ReportSigner {
    key: signature::EcdsaKeyPair,
    cert_pem: String,
}

impl ReportSigner {
    /// Load the collector's certificate and key.
    pub fn load(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, ReportError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| ReportError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let cert_pem = String::from_utf8(read(cert)?)
            .map_err(|_| ReportError::Key("certificate file is not text".into()))?;
        let key = match PrivateKeyDer::from_pem_slice(&read(key)?)
            .map_err(|e| ReportError::Key(e.to_string()))?
        {
            PrivateKeyDer::Pkcs8(der) => signature::EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                der.secret_pkcs8_der(),
                &ring::rand::SystemRandom::new(),
            )
            .map_err(|e| ReportError::Key(format!("not an ECDSA P-256 PKCS#8 key ({e})")))?,
            _ => return Err(ReportError::Key("not a PKCS#8 key".into())),
        };
        let signer = Self { key, cert_pem };
        // The key must belong to the certificate, or nobody could verify what it signs.
        let der = first_cert(&signer.cert_pem)?;
        if public_key(&der)? != signer.key.public_key().as_ref() {
            return Err(ReportError::Key(
                "the key does not belong to the certificate".into(),
            ));
        }
        Ok(signer)
    }

    /// The signing certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// An ECDSA P-256 / SHA-256 signature (ASN.1 DER) of `message` with the collector's key
    /// (for [`crate::checkpoint`], whose message names its own domain).
    pub fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>, ReportError> {
        self.key
            .sign(&ring::rand::SystemRandom::new(), message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| ReportError::Key("signing failed".into()))
    }

    /// The signed report document (canonical JSON and a newline) for `report`.
    pub fn sign(&self, report: Value) -> Result<String, ReportError> {
        let message = signed_message(&report, &self.cert_pem);
        let sig = self
            .key
            .sign(&ring::rand::SystemRandom::new(), message.as_bytes())
            .map_err(|_| ReportError::Key("signing failed".into()))?;
        let doc = json!({
            "format": FORMAT,
            "report": report,
            "signature": {
                "algorithm": ALGORITHM,
                "certificate_pem": self.cert_pem,
                "value": crate::chain::hex(sig.as_ref()),
            },
        });
        Ok(format!("{}\n", canonical_json(&doc)))
    }
}

/// What the signature covers: the prefix, then the canonical JSON of the report and the
/// signing certificate together (so neither can be swapped or altered).
fn signed_message(report: &Value, cert_pem: &str) -> String {
    format!(
        "{SIGNED_PREFIX}{}",
        canonical_json(&json!({"certificate_pem": cert_pem, "report": report}))
    )
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

pub(crate) fn first_cert(pem: &str) -> Result<Vec<u8>, ReportError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| ReportError::Malformed("no certificate".into()))?
        .map(|c| c.to_vec())
        .map_err(|e| ReportError::Malformed(format!("certificate: {e}")))
}

/// The subject public key bytes of a DER certificate.
pub(crate) fn public_key(der: &[u8]) -> Result<Vec<u8>, ReportError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| ReportError::Malformed(format!("certificate: {e}")))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// One breach-log record as a report carries it.
pub fn log_record_json(r: &LogRecord) -> Value {
    json!({
        "seq": r.seq,
        "at_unix_ms": r.at_unix_ms,
        "breach_id": r.breach_id,
        "event": r.event,
        "body_json": r.body_json,
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    })
}

/// Check a breach-log segment: consecutive sequence numbers, each record linking to the one
/// before, each hash matching its record. Returns the records checked.
pub fn verify_segment(records: &[Value]) -> Result<u64, ReportError> {
    let mut prev: Option<(u64, String)> = None;
    for v in records {
        let bad = |reason: &str| ReportError::Malformed(format!("breach log record: {reason}"));
        let r = LogRecord::from_stored(
            v["seq"].as_u64().ok_or_else(|| bad("seq"))?,
            v["at_unix_ms"].as_i64().ok_or_else(|| bad("at_unix_ms"))?,
            v["breach_id"]
                .as_str()
                .ok_or_else(|| bad("breach_id"))?
                .to_owned(),
            v["event"].as_str().ok_or_else(|| bad("event"))?.to_owned(),
            v["body_json"]
                .as_str()
                .ok_or_else(|| bad("body_json"))?
                .to_owned(),
            v["prev_hash"]
                .as_str()
                .ok_or_else(|| bad("prev_hash"))?
                .to_owned(),
            v["hash"].as_str().ok_or_else(|| bad("hash"))?.to_owned(),
        );
        if let Some((seq, hash)) = &prev {
            if r.seq != seq + 1 {
                return Err(ReportError::Chain {
                    seq: r.seq,
                    reason: format!("follows record {seq}"),
                });
            }
            if &r.prev_hash != hash {
                return Err(ReportError::Chain {
                    seq: r.seq,
                    reason: format!("prev_hash does not match record {seq}'s hash"),
                });
            }
        } else if r.seq == 1 && r.prev_hash != GENESIS_HASH {
            return Err(ReportError::Chain {
                seq: 1,
                reason: "prev_hash is not the genesis hash".into(),
            });
        }
        if r.compute_hash() != r.hash {
            return Err(ReportError::Chain {
                seq: r.seq,
                reason: "stored hash does not match its contents".into(),
            });
        }
        prev = Some((r.seq, r.hash));
    }
    Ok(records.len() as u64)
}

/// What [`verify`] found in a good report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// When the collector made it.
    pub generated_at: String,
    /// Its time range.
    pub since: String,
    /// Its time range.
    pub until: String,
    /// Breach-log records checked.
    pub log_records: u64,
    /// The last of them (empty when none).
    pub last_hash: String,
    /// Subject of the signing certificate.
    pub signer: String,
}

impl Verified {
    /// One line for `sovctl verify`.
    pub fn message(&self) -> String {
        format!(
            "report verified: signed by {} at {}, range {} to {}, breach log segment of {} records intact{}",
            self.signer,
            self.generated_at,
            self.since,
            self.until,
            self.log_records,
            if self.last_hash.is_empty() {
                String::new()
            } else {
                format!(", last hash {}", self.last_hash)
            }
        )
    }
}

/// Verify a report file (JSON or HTML form); `ca_pem`, when given, must have issued the
/// signing certificate.
pub fn verify(text: &str, ca_pem: Option<&str>) -> Result<Verified, ReportError> {
    if text.starts_with("<!doctype html>") {
        let start = text
            .find(EMBED_OPEN)
            .ok_or_else(|| ReportError::Malformed("no embedded report in the page".into()))?
            + EMBED_OPEN.len();
        let end = text[start..]
            .find(EMBED_CLOSE)
            .ok_or_else(|| ReportError::Malformed("embedded report not closed".into()))?
            + start;
        let json_text = format!("{}\n", text[start..end].replace("<\\/", "</"));
        let verified = verify(&json_text, ca_pem)?;
        if render_html(&json_text) != text {
            return Err(ReportError::Malformed(
                "the page is not exactly the rendering of its signed report (it was altered)"
                    .into(),
            ));
        }
        return Ok(verified);
    }
    let doc: Value =
        serde_json::from_str(text).map_err(|e| ReportError::Malformed(format!("not JSON: {e}")))?;
    if format!("{}\n", canonical_json(&doc)) != text {
        return Err(ReportError::Malformed(
            "the file is not exactly as signed (canonical JSON and one newline): it was altered"
                .into(),
        ));
    }
    if doc["format"] != FORMAT {
        return Err(ReportError::Malformed(format!(
            "format {} is not {FORMAT}",
            doc["format"]
        )));
    }
    let sig = &doc["signature"];
    if sig["algorithm"] != ALGORITHM {
        return Err(ReportError::Malformed(format!(
            "signature algorithm {} is not {ALGORITHM}",
            sig["algorithm"]
        )));
    }
    let cert_pem = sig["certificate_pem"]
        .as_str()
        .ok_or_else(|| ReportError::Malformed("no certificate".into()))?;
    let der = first_cert(cert_pem)?;
    let value = sig["value"]
        .as_str()
        .and_then(unhex)
        .ok_or_else(|| ReportError::Malformed("signature value is not hex".into()))?;
    let report = &doc["report"];
    let message = signed_message(report, cert_pem);
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, public_key(&der)?)
        .verify(message.as_bytes(), &value)
        .map_err(|_| ReportError::BadSignature)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| ReportError::Malformed(format!("certificate: {e}")))?;
    if let Some(ca_pem) = ca_pem {
        let ca_der = first_cert(ca_pem)?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
            .map_err(|e| ReportError::NotFromCa(e.to_string()))?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|e| ReportError::NotFromCa(e.to_string()))?;
    }
    let records = report["breach_log"]["records"]
        .as_array()
        .ok_or_else(|| ReportError::Malformed("no breach_log.records".into()))?;
    let log_records = verify_segment(records)?;
    // The breach log's signed checkpoint the report carries must agree with its segment.
    let cp = &report["checkpoints"]["breach_log"];
    if cp.is_object() {
        let cp = crate::checkpoint::SignedCheckpoint::from_json(cp)
            .map_err(|e| ReportError::Malformed(format!("checkpoints.breach_log: {e}")))?;
        let held = records
            .iter()
            .find(|r| r["seq"].as_u64() == Some(cp.checkpoint.seq));
        if let Some(r) = held
            && r["hash"].as_str() != Some(cp.checkpoint.hash.as_str())
        {
            return Err(ReportError::Chain {
                seq: cp.checkpoint.seq,
                reason: format!("does not match {}", cp.describe()),
            });
        }
    }
    Ok(Verified {
        generated_at: report["generated_at"].as_str().unwrap_or("").to_owned(),
        since: report["since"].as_str().unwrap_or("").to_owned(),
        until: report["until"].as_str().unwrap_or("").to_owned(),
        log_records,
        last_hash: records
            .last()
            .and_then(|r| r["hash"].as_str())
            .unwrap_or("")
            .to_owned(),
        signer: cert.subject().to_string(),
    })
}

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => esc(s),
        Value::Null => String::new(),
        other => esc(&other.to_string()),
    }
}

fn html_table(out: &mut String, columns: &[&str], rows: &[Value]) {
    out.push_str("<table><thead><tr>");
    for c in columns {
        let _ = write!(out, "<th>{}</th>", esc(c));
    }
    out.push_str("</tr></thead><tbody>\n");
    if rows.is_empty() {
        let _ = writeln!(out, "<tr><td colspan=\"{}\">none</td></tr>", columns.len());
    }
    for r in rows {
        out.push_str("<tr>");
        for c in columns {
            let _ = write!(out, "<td>{}</td>", cell(&r[*c]));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table>\n");
}

/// The HTML form of a signed report (the exact text [`ReportSigner::sign`] returned): a
/// self-contained page, no external assets, that embeds the signed JSON.
pub fn render_html(signed_json: &str) -> String {
    let doc: Value = serde_json::from_str(signed_json).unwrap_or(Value::Null);
    let r = &doc["report"];
    let mut out = String::new();
    out.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    let _ = write!(
        out,
        "<title>Sovereign evidence report {} to {}</title>",
        cell(&r["since"]),
        cell(&r["until"])
    );
    out.push_str(
        "<style>body{font:14px/1.45 system-ui,sans-serif;margin:20px;color:#1b2330}\
         table{border-collapse:collapse;margin:6px 0 16px}th,td{border-bottom:1px solid #ccc;\
         padding:3px 8px;text-align:left;vertical-align:top}code{font-size:12px}</style>\
         </head><body>\n",
    );
    out.push_str("<h1>Sovereign evidence report</h1>\n");
    let _ = writeln!(
        out,
        "<p>Jurisdiction <b>{}</b>, from {} to {}. Generated by the collector at {} for {}. \
         Check it with <code>sovctl verify FILE</code>: the signature, the breach log chain, and \
         that this page is exactly the rendering of the signed data below.</p>",
        cell(&r["scorecard"]["jurisdiction"]),
        // The start the answer covers (a range of days starts on the hour), else as asked.
        cell(if r["from"].is_null() {
            &r["since"]
        } else {
            &r["from"]
        }),
        cell(&r["until"]),
        cell(&r["generated_at"]),
        cell(&r["requested_by"]),
    );
    out.push_str("<h2>Scorecard</h2>\n");
    let rows = crate::view::scorecard_rows(&r["scorecard"]);
    html_table(&mut out, &crate::view::SCORECARD_COLUMNS, &rows);
    out.push_str("<h2>Breaches</h2>\n");
    let breaches: Vec<Value> = r["breaches"].as_array().cloned().unwrap_or_default();
    html_table(
        &mut out,
        &[
            "opened_at",
            "rule",
            "severity",
            "state",
            "node",
            "subject",
            "resolved_at",
            "count",
        ],
        &breaches,
    );
    out.push_str("<h2>Verdicts of the breaches' destinations</h2>\n");
    let destinations: Vec<Value> = r["destinations"].as_array().cloned().unwrap_or_default();
    html_table(&mut out, &crate::view::DESTINATION_COLUMNS, &destinations);
    out.push_str("<h2>Breach log segment</h2>\n");
    let records: Vec<Value> = r["breach_log"]["records"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    html_table(
        &mut out,
        &[
            "seq",
            "at_unix_ms",
            "breach_id",
            "event",
            "prev_hash",
            "hash",
        ],
        &records,
    );
    out.push_str("<h2>Geolocation databases</h2>\n<ul>");
    for s in r["geo_sources"].as_array().into_iter().flatten() {
        let _ = write!(out, "<li>{}</li>", cell(s));
    }
    out.push_str("</ul>\n<h2>Signature</h2>\n");
    let _ = writeln!(
        out,
        "<p>{} by the certificate below; value <code>{}</code></p><pre>{}</pre>",
        cell(&doc["signature"]["algorithm"]),
        cell(&doc["signature"]["value"]),
        cell(&doc["signature"]["certificate_pem"]),
    );
    out.push_str(EMBED_OPEN);
    out.push_str(&signed_json.trim_end_matches('\n').replace("</", "<\\/"));
    out.push_str(EMBED_CLOSE);
    out.push_str("\n</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a collector certificate signed by it, as `sov-collector pki init` makes them
    /// (ECDSA P-256 keys in PKCS#8 PEM), in a temporary directory.
    fn signer() -> (tempfile::TempDir, ReportSigner, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["collector".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("c.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let s = ReportSigner::load(&cert_path, &key_path).unwrap();
        (dir, s, ca)
    }

    fn sample_report() -> Value {
        let body = json!({
            "breach_id": "b1",
            "rule": "foreign-egress",
            "node": "n1",
            "subject": "country:US",
            "severity": "critical",
            "evidence": {"bytes": 5, "note": "</script>"},
        });
        let r1 = LogRecord::next(None, 1000, "b1", "open", body.clone());
        let r2 = LogRecord::next(Some((r1.seq, &r1.hash)), 2000, "b1", "updated", body);
        json!({
            "generated_at": "2026-01-01T00:00:00Z",
            "since": "2025-12-01T00:00:00Z",
            "until": "2026-01-01T00:00:00Z",
            "requested_by": "regulator/analyst",
            "scorecard": {"jurisdiction": "MA", "data": {"share_leaving": 0.7778}},
            "breaches": [],
            "breach_log": {"records": [log_record_json(&r1), log_record_json(&r2)]},
            "geo_sources": ["embedded"],
        })
    }

    #[test]
    fn a_signed_report_verifies_and_any_altered_byte_fails() {
        let (_dir, s, ca) = signer();
        let text = s.sign(sample_report()).unwrap();
        let v = verify(&text, Some(&ca)).unwrap();
        assert_eq!(v.log_records, 2);
        assert!(
            v.message().starts_with("report verified"),
            "{}",
            v.message()
        );
        // Every single-byte change breaks it: sample positions across the whole file.
        let bytes = text.as_bytes();
        for i in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
            let mut altered = bytes.to_vec();
            altered[i] = if altered[i] == b'0' { b'1' } else { b'0' };
            let Ok(altered) = String::from_utf8(altered) else {
                continue;
            };
            assert!(
                verify(&altered, None).is_err(),
                "byte {i} altered still verifies"
            );
        }
    }

    #[test]
    fn a_report_signed_by_another_collector_fails_the_ca_check_and_a_swapped_certificate_the_signature()
     {
        let (_d1, s1, ca1) = signer();
        let (_d2, s2, _ca2) = signer();
        let text = s2.sign(sample_report()).unwrap();
        assert!(verify(&text, None).is_ok());
        assert!(matches!(
            verify(&text, Some(&ca1)),
            Err(ReportError::NotFromCa(_))
        ));
        // Put collector 1's certificate on collector 2's signature.
        let mut doc: Value = serde_json::from_str(&text).unwrap();
        doc["signature"]["certificate_pem"] = json!(s1.cert_pem);
        let swapped = format!("{}\n", canonical_json(&doc));
        assert!(matches!(
            verify(&swapped, None),
            Err(ReportError::BadSignature)
        ));
    }

    #[test]
    fn a_broken_log_segment_is_named_even_when_re_signed() {
        let (_dir, s, _) = signer();
        let mut report = sample_report();
        report["breach_log"]["records"][1]["body_json"] = json!("{}");
        let text = s.sign(report).unwrap();
        let err = verify(&text, None).unwrap_err();
        assert!(matches!(err, ReportError::Chain { seq: 2, .. }), "{err}");
    }

    #[test]
    fn the_html_form_embeds_the_signed_report_and_verifies_only_unaltered() {
        let (_dir, s, ca) = signer();
        let text = s.sign(sample_report()).unwrap();
        let html = render_html(&text);
        assert!(html.contains("Sovereign evidence report"));
        assert!(
            !html.contains("\"note\":\"</script>"),
            "embedded JSON must not close the script"
        );
        verify(&html, Some(&ca)).unwrap();
        let altered = html.replacen("Scorecard", "Scorecart", 1);
        assert!(verify(&altered, None).is_err());
    }
}
