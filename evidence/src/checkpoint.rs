//! Signed checkpoints of a chained log's head: the key the hash chain lacks.
//!
//! The hash chain ([`crate::chain`]) shows that no record was changed *unless the whole chain
//! after it was recomputed*, which anyone with write access to the database can do. A
//! checkpoint is the head of a log, `(log, seq, hash)`, at a time, signed with the collector's
//! key (ECDSA P-256 / SHA-256, the key that signs evidence reports) over
//! `"sovereign.checkpoint.v1\n"` followed by the canonical JSON of
//! `{"certificate_pem": ..., "checkpoint": {"at_unix_ms", "hash", "log", "seq"}}`.
//! A log rewritten with its hashes recomputed no longer holds the signed hash at the signed
//! seq ([`Anchors::record`] names the checkpoint); a log cut short before a signed seq is
//! detected by [`Anchors::finish`].
//!
//! What a checkpoint does not prove: records after the last checkpoint are covered by the
//! chain only; a checkpoint deleted together with the records after it leaves no trace in
//! the database. Checkpoints kept elsewhere (every alert and evidence report carries the latest
//! one) are checked the same way ([`find_in`]).

use ring::signature;
use serde_json::{Value, json};

use crate::chain::{ChainError, GENESIS_HASH, canonical_json, hex};
use crate::report::{ALGORITHM, ReportError, ReportSigner, first_cert, public_key, unhex};

/// The `format` of a signed checkpoint.
pub const FORMAT: &str = "sovereign.checkpoint.v1";
/// What the signature covers, before the canonical JSON.
const SIGNED_PREFIX: &str = "sovereign.checkpoint.v1\n";
/// `log` of the breach log's checkpoints.
pub const BREACH_LOG: &str = "breach-log";
/// `log` of the audit log's checkpoints.
pub const AUDIT_LOG: &str = "audit-log";

/// Why a checkpoint is not one to trust.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Not a signed checkpoint.
    #[error("not a signed checkpoint: {0}")]
    Malformed(String),
    /// The signature does not match.
    #[error(
        "checkpoint signature does not match: the checkpoint was altered or signed by another key"
    )]
    BadSignature,
    /// Signed, but not by the collector.
    #[error("checkpoint not signed by the collector: {0}")]
    Untrusted(String),
}

/// The head of a chained log at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// [`BREACH_LOG`] or [`AUDIT_LOG`].
    pub log: String,
    /// The last record's seq (0: the log was empty).
    pub seq: u64,
    /// Its hash ([`GENESIS_HASH`] for an empty log).
    pub hash: String,
    /// When it was signed, Unix ms.
    pub at_unix_ms: i64,
}

impl Checkpoint {
    fn json(&self) -> Value {
        json!({
            "log": self.log,
            "seq": self.seq,
            "hash": self.hash,
            "at_unix_ms": self.at_unix_ms,
        })
    }
}

/// A [`Checkpoint`] with its signature and the signing certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// What is signed.
    pub checkpoint: Checkpoint,
    /// The signing certificate, PEM.
    pub certificate_pem: String,
    /// The signature, hex of ASN.1 DER.
    pub signature: String,
}

fn signed_message(c: &Checkpoint, cert_pem: &str) -> String {
    format!(
        "{SIGNED_PREFIX}{}",
        canonical_json(&json!({"certificate_pem": cert_pem, "checkpoint": c.json()}))
    )
}

impl SignedCheckpoint {
    /// Sign `checkpoint` with the collector's key.
    pub fn sign(signer: &ReportSigner, checkpoint: Checkpoint) -> Result<Self, ReportError> {
        let cert_pem = signer.cert_pem().to_owned();
        let sig = signer.sign_message(signed_message(&checkpoint, &cert_pem).as_bytes())?;
        Ok(Self {
            checkpoint,
            certificate_pem: cert_pem,
            signature: hex(&sig),
        })
    }

    /// `{"format", "checkpoint", "signature": {"algorithm", "certificate_pem", "value"}}`.
    pub fn to_json(&self) -> Value {
        json!({
            "format": FORMAT,
            "checkpoint": self.checkpoint.json(),
            "signature": {
                "algorithm": ALGORITHM,
                "certificate_pem": self.certificate_pem,
                "value": self.signature,
            },
        })
    }

    /// [`Self::to_json`] as canonical JSON (how a store keeps it).
    pub fn to_text(&self) -> String {
        canonical_json(&self.to_json())
    }

    /// Read [`Self::to_json`]'s form back (the signature is not checked here).
    pub fn from_json(v: &Value) -> Result<Self, CheckpointError> {
        let bad = |what: &str| CheckpointError::Malformed(what.to_owned());
        if v["format"] != FORMAT {
            return Err(bad("format is not sovereign.checkpoint.v1"));
        }
        if v["signature"]["algorithm"] != ALGORITHM {
            return Err(bad("signature algorithm is not ecdsa-p256-sha256"));
        }
        let c = &v["checkpoint"];
        Ok(Self {
            checkpoint: Checkpoint {
                log: c["log"].as_str().ok_or_else(|| bad("no log"))?.to_owned(),
                seq: c["seq"].as_u64().ok_or_else(|| bad("no seq"))?,
                hash: c["hash"].as_str().ok_or_else(|| bad("no hash"))?.to_owned(),
                at_unix_ms: c["at_unix_ms"]
                    .as_i64()
                    .ok_or_else(|| bad("no at_unix_ms"))?,
            },
            certificate_pem: v["signature"]["certificate_pem"]
                .as_str()
                .ok_or_else(|| bad("no certificate"))?
                .to_owned(),
            signature: v["signature"]["value"]
                .as_str()
                .ok_or_else(|| bad("no signature value"))?
                .to_owned(),
        })
    }

    /// [`Self::from_json`] of stored text.
    pub fn from_text(text: &str) -> Result<Self, CheckpointError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| CheckpointError::Malformed(format!("not JSON: {e}")))?;
        Self::from_json(&v)
    }

    /// Check the signature and that `trust` accepts its certificate; the signer's subject.
    pub fn verify(&self, trust: &Trust) -> Result<String, CheckpointError> {
        let malformed = |e: ReportError| CheckpointError::Malformed(e.to_string());
        let der = first_cert(&self.certificate_pem).map_err(malformed)?;
        let key = public_key(&der).map_err(malformed)?;
        let value = unhex(&self.signature)
            .ok_or_else(|| CheckpointError::Malformed("signature value is not hex".into()))?;
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &key)
            .verify(
                signed_message(&self.checkpoint, &self.certificate_pem).as_bytes(),
                &value,
            )
            .map_err(|_| CheckpointError::BadSignature)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CheckpointError::Malformed(format!("certificate: {e}")))?;
        let subject = cert.subject().to_string();
        if trust.collector_keys.contains(&key) {
            return Ok(subject);
        }
        // Another certificate of the collector (before a rotation): issued by the CA and a
        // server's (agents' and people's certificates from the same CA are clients only, so a
        // node cannot sign checkpoints with its own key).
        let Some(ca_der) = &trust.ca_der else {
            return Err(CheckpointError::Untrusted(format!(
                "{subject} is not the collector's certificate"
            )));
        };
        let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
            .map_err(|e| CheckpointError::Untrusted(format!("the CA: {e}")))?;
        cert.verify_signature(Some(ca.public_key())).map_err(|_| {
            CheckpointError::Untrusted(format!(
                "{subject} is neither the collector's certificate nor issued by its CA"
            ))
        })?;
        let server = cert
            .extended_key_usage()
            .ok()
            .flatten()
            .is_some_and(|e| e.value.server_auth);
        if !server {
            return Err(CheckpointError::Untrusted(format!(
                "{subject} is not a server certificate (a client of the CA cannot sign checkpoints)"
            )));
        }
        Ok(subject)
    }

    /// `the signed checkpoint of breach-log record 3 (signed at 2026-…)`.
    pub fn describe(&self) -> String {
        format!(
            "the signed checkpoint of {} record {} (signed at {})",
            self.checkpoint.log,
            self.checkpoint.seq,
            crate::view::rfc3339(self.checkpoint.at_unix_ms)
        )
    }
}

/// Whose signatures a checkpoint may carry: the collector's current certificate, or any
/// server certificate issued by its CA (the collector's certificate before a rotation).
#[derive(Debug, Clone, Default)]
pub struct Trust {
    collector_keys: Vec<Vec<u8>>,
    ca_der: Option<Vec<u8>>,
}

impl Trust {
    /// Trust the certificate `collector_cert_pem` and server certificates of `ca_pem`.
    pub fn new(
        collector_cert_pem: Option<&str>,
        ca_pem: Option<&str>,
    ) -> Result<Self, ReportError> {
        let mut t = Self::default();
        if let Some(pem) = collector_cert_pem {
            t.collector_keys.push(public_key(&first_cert(pem)?)?);
        }
        if let Some(pem) = ca_pem {
            t.ca_der = Some(first_cert(pem)?);
        }
        Ok(t)
    }
}

/// Every signed checkpoint of `log` anywhere in `v` (a checkpoint file, an alert's body, an
/// evidence report), at any depth.
pub fn find_in(v: &Value, log: &str) -> Vec<Value> {
    let mut out = Vec::new();
    collect(v, log, &mut out, 0);
    out
}

fn collect(v: &Value, log: &str, out: &mut Vec<Value>, depth: usize) {
    if depth > 16 {
        return;
    }
    match v {
        Value::Object(map) => {
            if v["format"] == FORMAT && v["checkpoint"]["log"] == log {
                out.push(v.clone());
                return;
            }
            for item in map.values() {
                collect(item, log, out, depth + 1);
            }
        }
        Value::Array(items) => {
            for item in items {
                collect(item, log, out, depth + 1);
            }
        }
        _ => {}
    }
}

/// What the checkpoints of a log showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorSummary {
    /// Checkpoints whose hash the log holds at their seq.
    pub matched: u64,
    /// The latest of them: `(seq, at_unix_ms)`.
    pub last: Option<(u64, i64)>,
    /// Records after the last checkpoint (covered by the chain only).
    pub uncovered: u64,
}

impl AnchorSummary {
    /// `; 4 signed checkpoints match, the last at record 3 (signed at …); records 4 to 5 are
    /// after it`.
    pub fn message(&self, end: u64) -> String {
        let Some((seq, at)) = self.last else {
            return "; no signed checkpoint".into();
        };
        let mut s = format!(
            "; {} signed checkpoint{} the last at record {seq} (signed at {})",
            self.matched,
            if self.matched == 1 {
                " matches,"
            } else {
                "s match,"
            },
            crate::view::rfc3339(at)
        );
        if self.uncovered > 0 {
            s.push_str(&format!(
                "; records {} to {end} are after it (chained, not yet signed)",
                seq + 1
            ));
        }
        s
    }
}

/// Checks a log against signed checkpoints while its chain is verified record by record.
/// The checkpoints must already be verified ([`SignedCheckpoint::verify`]).
#[derive(Debug, Clone, Default)]
pub struct Anchors {
    /// Sorted by seq, descending (the next one to meet is last).
    pending: Vec<SignedCheckpoint>,
    matched: u64,
    last: Option<(u64, i64)>,
    /// A log with records must have at least one checkpoint.
    required: bool,
    /// A checkpoint of the empty log that does not hold the genesis hash.
    bad_genesis: Option<ChainError>,
}

impl Anchors {
    /// No checkpoints, none required (the chain alone).
    pub fn none() -> Self {
        Self::default()
    }

    /// Check against `checkpoints`; a log with records and no checkpoint at all fails (the
    /// collector signs its heads at start, so only a deleted set of checkpoints leaves none).
    pub fn new(mut checkpoints: Vec<SignedCheckpoint>) -> Self {
        checkpoints.sort_by_key(|c| std::cmp::Reverse(c.checkpoint.seq));
        let mut a = Self {
            pending: checkpoints,
            required: true,
            ..Self::default()
        };
        // Checkpoints of the empty log hold the genesis hash.
        a.bad_genesis = a.record(0, GENESIS_HASH).err();
        a
    }

    /// The chain holds record `seq` with `hash` (verified): it must match every checkpoint of
    /// that seq.
    pub fn record(&mut self, seq: u64, hash: &str) -> Result<(), ChainError> {
        while let Some(next) = self.pending.last() {
            if next.checkpoint.seq > seq {
                break;
            }
            if next.checkpoint.seq == seq {
                if next.checkpoint.hash != hash {
                    return Err(ChainError {
                        seq,
                        reason: format!(
                            "does not match {}: it signed hash {}, the log holds {hash}; \
                             the log was rewritten after it was signed (a record at or before \
                             {seq} changed and the chain was recomputed)",
                            next.describe(),
                            next.checkpoint.hash
                        ),
                    });
                }
                self.matched += 1;
                if self
                    .last
                    .is_none_or(|(s, at)| (seq, next.checkpoint.at_unix_ms) > (s, at))
                {
                    self.last = Some((seq, next.checkpoint.at_unix_ms));
                }
            }
            self.pending.pop();
        }
        Ok(())
    }

    /// The log ends at record `end`: a checkpoint beyond it means records were cut off.
    pub fn finish(self, end: u64) -> Result<AnchorSummary, ChainError> {
        if let Some(e) = self.bad_genesis {
            return Err(e);
        }
        if let Some(beyond) = self.pending.first() {
            return Err(ChainError {
                seq: end + 1,
                reason: format!(
                    "the log was truncated: {} exists, but the log ends at record {end}",
                    beyond.describe()
                ),
            });
        }
        if self.required && end > 0 && self.last.is_none() {
            return Err(ChainError {
                seq: 1,
                reason: "no signed checkpoint covers this log: its checkpoints were deleted \
                         (a running collector signs its heads at start, every \
                         checkpoint_interval_secs and at shutdown)"
                    .into(),
            });
        }
        Ok(AnchorSummary {
            matched: self.matched,
            uncovered: self.last.map_or(end, |(seq, _)| end.saturating_sub(seq)),
            last: self.last,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cp(seq: u64, hash: &str) -> SignedCheckpoint {
        SignedCheckpoint {
            checkpoint: Checkpoint {
                log: BREACH_LOG.into(),
                seq,
                hash: hash.into(),
                at_unix_ms: 1_800_000_000_000,
            },
            certificate_pem: String::new(),
            signature: String::new(),
        }
    }

    #[test]
    fn a_checkpoint_that_does_not_match_names_itself_and_one_beyond_the_end_is_truncation() {
        let mut a = Anchors::new(vec![cp(2, "b"), cp(0, GENESIS_HASH)]);
        a.record(1, "a").unwrap();
        let e = a.record(2, "x").unwrap_err();
        assert_eq!(e.seq, 2);
        assert!(
            e.reason
                .contains("signed checkpoint of breach-log record 2"),
            "{e}"
        );

        let mut a = Anchors::new(vec![cp(3, "c")]);
        a.record(1, "a").unwrap();
        a.record(2, "b").unwrap();
        let e = a.finish(2).unwrap_err();
        assert!(e.reason.contains("truncated"), "{e}");

        let mut a = Anchors::new(vec![cp(1, "a")]);
        a.record(1, "a").unwrap();
        a.record(2, "b").unwrap();
        let s = a.finish(2).unwrap();
        assert_eq!(
            (s.matched, s.last.map(|l| l.0), s.uncovered),
            (1, Some(1), 1)
        );
    }

    /// A CA, a collector (server) certificate and a node (client) certificate of that CA, and a
    /// signer for each.
    fn pki() -> (tempfile::TempDir, String, ReportSigner, ReportSigner) {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let signer = |name: &str, eku: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
            params.extended_key_usages = vec![eku];
            let cert = params.signed_by(&key, &issuer).unwrap();
            let (c, k) = (
                dir.path().join(format!("{name}.pem")),
                dir.path().join(format!("{name}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            ReportSigner::load(&c, &k).unwrap()
        };
        let collector = signer("collector", ExtendedKeyUsagePurpose::ServerAuth);
        let node = signer("node", ExtendedKeyUsagePurpose::ClientAuth);
        (dir, ca, collector, node)
    }

    #[test]
    fn a_checkpoint_signed_by_the_collector_verifies_and_an_altered_one_or_a_nodes_does_not() {
        let (_dir, ca, collector, node) = pki();
        let c = Checkpoint {
            log: AUDIT_LOG.into(),
            seq: 7,
            hash: "ab".repeat(32),
            at_unix_ms: 1_800_000_000_000,
        };
        let signed = SignedCheckpoint::sign(&collector, c.clone()).unwrap();
        let back = SignedCheckpoint::from_text(&signed.to_text()).unwrap();
        assert_eq!(back, signed);
        // By the current certificate, or by any server certificate of the CA.
        let current = Trust::new(Some(collector.cert_pem()), None).unwrap();
        let by_ca = Trust::new(None, Some(&ca)).unwrap();
        back.verify(&current).unwrap();
        back.verify(&by_ca).unwrap();
        let mut altered = back.clone();
        altered.checkpoint.seq = 8;
        assert!(matches!(
            altered.verify(&by_ca),
            Err(CheckpointError::BadSignature)
        ));
        // A node's certificate from the same CA signs validly, but is not the collector's.
        let forged = SignedCheckpoint::sign(&node, c).unwrap();
        let e = forged.verify(&by_ca).unwrap_err();
        assert!(matches!(e, CheckpointError::Untrusted(_)), "{e}");
        assert!(forged.verify(&current).is_err());
    }

    #[test]
    fn a_log_with_records_and_no_checkpoint_fails_but_the_chain_alone_does_not_require_one() {
        let a = Anchors::new(Vec::new());
        assert!(
            a.finish(3)
                .unwrap_err()
                .reason
                .contains("no signed checkpoint")
        );
        assert!(Anchors::new(Vec::new()).finish(0).is_ok());
        assert!(Anchors::none().finish(3).is_ok());
        // A checkpoint of the empty log must hold the genesis hash.
        let a = Anchors::new(vec![cp(0, "x")]);
        assert_eq!(a.finish(0).unwrap_err().seq, 0);
    }

    #[test]
    fn checkpoints_are_found_at_any_depth_of_an_alert_or_a_report() {
        let signed = json!({"format": FORMAT, "checkpoint": {"log": BREACH_LOG, "seq": 1}});
        let alert = json!({"seq": 4, "checkpoint": signed.clone()});
        let report = json!({"report": {"checkpoints": {"breach_log": signed, "audit_log": null}}});
        assert_eq!(find_in(&alert, BREACH_LOG).len(), 1);
        assert_eq!(find_in(&report, BREACH_LOG).len(), 1);
        assert!(find_in(&report, AUDIT_LOG).is_empty());
    }
}
