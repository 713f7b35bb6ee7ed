//! The audit log: every query a regulator or admin makes, over gRPC or HTTPS, hash-chained.
//!
//! Each query appends one [`AuditRecord`] (who, with which role and credential, which call,
//! its parameters, how many rows it returned or which error it got, when) to the store's
//! `audit_log` table, after the query ran and before its answer is sent: a query whose record
//! cannot be written is refused (UNAVAILABLE / 503), so no question goes unrecorded.
//!
//! The chain is the breach log's ([`crate::chain`]): a record hashes like a [`LogRecord`] whose
//! `breach_id` is the actor (`role/name`), whose `event` is the call, and whose body is the
//! canonical JSON of [`AuditEntry::body`]; [`crate::chain::ChainVerifier`] checks it. The two
//! logs live in separate tables with separate chains, each from its own genesis.

use serde_json::{Value, json};

use sov_proto::pb;

use crate::chain::LogRecord;

/// What one query did, before it is chained.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// When the query was answered, Unix ms.
    pub at_unix_ms: i64,
    /// Principal name (from the certificate, or `token:<id>` for an API token).
    pub who: String,
    /// Role the principal acted with.
    pub role: String,
    /// How it was authenticated and reached us: `grpc`, `https-cert` or `https-token`.
    pub via: String,
    /// The call, e.g. `ListNodes` (the gRPC method name; HTTP routes map onto the same names).
    pub call: String,
    /// The query's parameters, as a JSON object.
    pub params: Value,
    /// Rows (or objects) in the answer; 0 for a refused query.
    pub rows: u64,
    /// `ok`, or the status the query ended with (e.g. `invalid_argument: ...`).
    pub outcome: String,
}

impl AuditEntry {
    /// The actor as stored and hashed: `role/name`.
    pub fn actor(&self) -> String {
        format!("{}/{}", self.role, self.who)
    }

    /// The body stored and hashed (canonical JSON of this object).
    pub fn body(&self) -> Value {
        json!({
            "who": self.who,
            "role": self.role,
            "via": self.via,
            "call": self.call,
            "params": self.params,
            "rows": self.rows,
            "outcome": self.outcome,
        })
    }
}

/// One record of the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Position in the log, from 1, without holes.
    pub seq: u64,
    /// When, Unix ms.
    pub at_unix_ms: i64,
    /// `role/name`.
    pub actor: String,
    /// The call.
    pub call: String,
    /// The body exactly as stored and hashed.
    pub body_json: String,
    /// Hash of the previous record (64 zeros for the first).
    pub prev_hash: String,
    /// Hash of this record.
    pub hash: String,
}

impl AuditRecord {
    /// The record that follows `prev` (`(seq, hash)` of the log's last record; `None` for an
    /// empty log).
    pub fn next(prev: Option<(u64, &str)>, entry: &AuditEntry) -> Self {
        Self::from_log_record(LogRecord::next(
            prev,
            entry.at_unix_ms,
            &entry.actor(),
            &entry.call,
            entry.body(),
        ))
    }

    /// A chained record read as an audit record (actor in `breach_id`, call in `event`).
    pub fn from_log_record(r: LogRecord) -> Self {
        Self {
            seq: r.seq,
            at_unix_ms: r.at_unix_ms,
            actor: r.breach_id,
            call: r.event,
            body_json: r.body_json,
            prev_hash: r.prev_hash,
            hash: r.hash,
        }
    }

    /// The body parsed (`null` when the stored text is not JSON: a tampered database).
    pub fn body(&self) -> Value {
        serde_json::from_str(&self.body_json).unwrap_or(Value::Null)
    }

    /// The same record in the breach log's shape, for [`crate::chain::ChainVerifier`].
    pub fn as_log_record(&self) -> LogRecord {
        LogRecord::from_stored(
            self.seq,
            self.at_unix_ms,
            self.actor.clone(),
            self.call.clone(),
            self.body_json.clone(),
            self.prev_hash.clone(),
            self.hash.clone(),
        )
    }

    /// The record as the JSON object the API and `sovctl audit` print.
    pub fn to_json(&self) -> Value {
        let body = self.body();
        json!({
            "seq": self.seq,
            "at": crate::view::rfc3339(self.at_unix_ms),
            "at_unix_ms": self.at_unix_ms,
            "who": body["who"],
            "role": body["role"],
            "via": body["via"],
            "call": self.call,
            "params": body["params"],
            "rows": body["rows"],
            "outcome": body["outcome"],
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        })
    }
}

impl From<AuditRecord> for pb::AuditRecord {
    fn from(r: AuditRecord) -> Self {
        Self {
            seq: r.seq,
            at_unix_ms: r.at_unix_ms,
            actor: r.actor,
            call: r.call,
            body_json: r.body_json,
            prev_hash: r.prev_hash,
            hash: r.hash,
        }
    }
}

impl From<pb::AuditRecord> for AuditRecord {
    fn from(r: pb::AuditRecord) -> Self {
        Self {
            seq: r.seq,
            at_unix_ms: r.at_unix_ms,
            actor: r.actor,
            call: r.call,
            body_json: r.body_json,
            prev_hash: r.prev_hash,
            hash: r.hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::verify_chain;

    fn entry(call: &str, rows: u64) -> AuditEntry {
        AuditEntry {
            at_unix_ms: 1000,
            who: "analyst".into(),
            role: "regulator".into(),
            via: "grpc".into(),
            call: call.into(),
            params: json!({"limit": 10}),
            rows,
            outcome: "ok".into(),
        }
    }

    fn chain() -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = Vec::new();
        for (call, rows) in [("ListNodes", 3), ("Egress", 7), ("ListAudit", 2)] {
            let prev = out.last().map(|r| (r.seq, r.hash.clone()));
            out.push(AuditRecord::next(
                prev.as_ref().map(|(s, h)| (*s, h.as_str())),
                &entry(call, rows),
            ));
        }
        out
    }

    #[test]
    fn audit_records_chain_from_the_genesis_and_verify_with_the_breach_log_verifier() {
        let log = chain();
        assert_eq!(log[0].prev_hash, crate::chain::GENESIS_HASH);
        assert_eq!(log[1].prev_hash, log[0].hash);
        assert_eq!(log[2].seq, 3);
        assert_eq!(
            verify_chain(log.iter().map(AuditRecord::as_log_record)),
            Ok(3)
        );
    }

    #[test]
    fn a_changed_row_count_breaks_the_chain_at_that_record() {
        let mut log = chain();
        log[1].body_json = log[1].body_json.replace("\"rows\":7", "\"rows\":0");
        let err = verify_chain(log.iter().map(AuditRecord::as_log_record)).unwrap_err();
        assert_eq!(err.seq, 2, "{err}");
    }

    #[test]
    fn the_json_form_names_who_what_parameters_when_and_result_size() {
        let v = chain()[1].to_json();
        assert_eq!(v["who"], "analyst");
        assert_eq!(v["role"], "regulator");
        assert_eq!(v["call"], "Egress");
        assert_eq!(v["params"]["limit"], 10);
        assert_eq!(v["rows"], 7);
        assert_eq!(v["at"], "1970-01-01T00:00:01Z");
        assert_eq!(v["seq"], 2);
    }
}
