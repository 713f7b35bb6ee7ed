//! Policy breaches and their tamper-evident log.
//!
//! A rule reports an [`Observation`] each time it evaluates and finds a violation. The store
//! ([`crate::store::Store::observe_breach`]) folds it into the one open [`Breach`] of its
//! `(rule, node, subject)`, opening one when there is none; a breach whose rule has not seen
//! it for the quiet period is resolved ([`crate::store::Store::resolve_quiet_breaches`]).
//!
//! Every state change is appended, in the same transaction, to the breach log: one
//! [`LogRecord`] per change ([`Breach::log_record`]), carrying a snapshot of the breach and the
//! hash of the previous record ([`sov_evidence::chain`], which also verifies it). Keep the last
//! hash that `sov-collector verify-log` prints somewhere else (a ticket, a regulator's
//! mailbox): cutting records off the end leaves a valid shorter chain.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sov_evidence::chain::{LogRecord, canonical_json, digest_fields, hex};

/// Log event of a newly opened breach.
pub const EVENT_OPEN: &str = "open";
/// Log event of an open breach whose severity or evidence changed.
pub const EVENT_UPDATED: &str = "updated";
/// Log event of a breach resolved after its quiet period.
pub const EVENT_RESOLVED: &str = "resolved";

/// Domain separation of [`breach_id`].
const BREACH_ID_DOMAIN: &str = "sovereign.breach-id.v1";

/// A value that is not one of an enumeration's names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}: use {expected}")]
pub struct ParseEnumError {
    what: &'static str,
    value: String,
    expected: &'static str,
}

/// How serious a breach is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// Needs attention.
    #[default]
    Warning,
    /// Needs action now.
    Critical,
}

impl Severity {
    /// `info`, `warning` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "info" => Ok(Self::Info),
            "warning" => Ok(Self::Warning),
            "critical" => Ok(Self::Critical),
            other => Err(ParseEnumError {
                what: "severity",
                value: other.to_owned(),
                expected: "info, warning or critical",
            }),
        }
    }
}

/// Where a breach is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BreachState {
    /// Still being observed (or not yet quiet for long enough).
    Open,
    /// Not observed for the quiet period.
    Resolved,
}

impl BreachState {
    /// `open` or `resolved`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Resolved => "resolved",
        }
    }
}

impl fmt::Display for BreachState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BreachState {
    type Err = ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Self::Open),
            "resolved" => Ok(Self::Resolved),
            other => Err(ParseEnumError {
                what: "breach state",
                value: other.to_owned(),
                expected: "open or resolved",
            }),
        }
    }
}

/// What a rule reports each time it evaluates and finds a violation.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Rule name (from the policy).
    pub rule: String,
    /// Node the violation is on.
    pub node: String,
    /// What on the node violates it (a model sha256, a process, a destination...); breaches
    /// are deduplicated by `(rule, node, subject)`.
    pub subject: String,
    /// How serious it is now.
    pub severity: Severity,
    /// What the rule saw (any JSON; objects are compared and hashed with sorted keys).
    pub evidence: Value,
    /// When the rule saw it, Unix ms.
    pub at_unix_ms: i64,
}

/// One breach: a violation of one rule by one subject on one node, from the first observation
/// until it has been quiet for the rule's quiet period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Breach {
    /// Stable identifier ([`breach_id`]): 32 hex digits.
    pub breach_id: String,
    /// Rule name.
    pub rule: String,
    /// Node.
    pub node: String,
    /// Subject.
    pub subject: String,
    /// Severity of the latest observation.
    pub severity: Severity,
    /// Open or resolved.
    pub state: BreachState,
    /// Evidence of the latest observation.
    pub evidence: Value,
    /// First observation, Unix ms.
    pub opened_at_unix_ms: i64,
    /// Latest observation, Unix ms.
    pub last_seen_unix_ms: i64,
    /// When it was resolved, Unix ms; `None` while open.
    pub resolved_at_unix_ms: Option<i64>,
    /// Observations folded into it.
    pub count: u64,
}

impl Breach {
    /// A new open breach from its first observation; `open_seq` is the sequence number of
    /// its "open" log record (it makes the id unique even when the same key reopens within
    /// one millisecond).
    pub fn opened(obs: &Observation, open_seq: u64) -> Self {
        Self {
            breach_id: breach_id(&obs.rule, &obs.node, &obs.subject, obs.at_unix_ms, open_seq),
            rule: obs.rule.clone(),
            node: obs.node.clone(),
            subject: obs.subject.clone(),
            severity: obs.severity,
            state: BreachState::Open,
            evidence: obs.evidence.clone(),
            opened_at_unix_ms: obs.at_unix_ms,
            last_seen_unix_ms: obs.at_unix_ms,
            resolved_at_unix_ms: None,
            count: 1,
        }
    }

    /// Fold a later observation of the same key into this open breach: last seen (the later
    /// of the two), count + 1, and the observation's severity and evidence. `stored_evidence`
    /// is the canonical JSON text the store holds for the current evidence. True when the
    /// severity or the evidence changed, i.e. when an "updated" record is due; values under
    /// the evidence's [`EVIDENCE_COUNTERS`] key (bytes, seconds, top lists) are kept current
    /// in the breach row but do not make a log record of their own.
    pub(crate) fn fold(&mut self, obs: &Observation, stored_evidence: &str) -> bool {
        let stored: Value = serde_json::from_str(stored_evidence).unwrap_or(Value::Null);
        let changed = self.severity != obs.severity
            || canonical_json(&material(&stored)) != canonical_json(&material(&obs.evidence));
        self.last_seen_unix_ms = self.last_seen_unix_ms.max(obs.at_unix_ms);
        self.count = self.count.saturating_add(1);
        self.severity = obs.severity;
        self.evidence = obs.evidence.clone();
        changed
    }

    /// The log record of this breach after `event`, following `last` (`(seq, hash)` of the
    /// log's last record; `None` for an empty log).
    pub fn log_record(
        &self,
        last: &Option<(u64, String)>,
        at_unix_ms: i64,
        event: &str,
    ) -> LogRecord {
        let prev = last.as_ref().map(|(s, h)| (*s, h.as_str()));
        LogRecord::next(prev, at_unix_ms, &self.breach_id, event, self.snapshot())
    }

    /// The breach as a JSON object (the body of its log records).
    pub fn snapshot(&self) -> Value {
        serde_json::json!({
            "breach_id": self.breach_id,
            "rule": self.rule,
            "node": self.node,
            "subject": self.subject,
            "severity": self.severity.as_str(),
            "state": self.state.as_str(),
            "evidence": self.evidence,
            "opened_at_unix_ms": self.opened_at_unix_ms,
            "last_seen_unix_ms": self.last_seen_unix_ms,
            "resolved_at_unix_ms": self.resolved_at_unix_ms,
            "count": self.count,
        })
    }
}

/// Evidence key whose values change with every evaluation (byte counts, durations, top
/// lists): an "updated" log record is due only when something outside it changes.
pub const EVIDENCE_COUNTERS: &str = "counters";

/// The evidence without its [`EVIDENCE_COUNTERS`].
fn material(evidence: &Value) -> Value {
    match evidence {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| k.as_str() != EVIDENCE_COUNTERS)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// What [`crate::store::Store::observe_breach`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum BreachChange {
    /// No open breach had this key: one was opened and an "open" record appended.
    Opened(Breach),
    /// The open breach's severity or evidence changed: an "updated" record was appended.
    Updated(Breach),
    /// Same severity and evidence: only last seen and the count moved; nothing was appended
    /// (the log records changes, not every evaluation).
    Unchanged(Breach),
}

impl BreachChange {
    /// The breach after the change.
    pub fn breach(&self) -> &Breach {
        match self {
            Self::Opened(b) | Self::Updated(b) | Self::Unchanged(b) => b,
        }
    }

    /// The log event appended, if any ("open" or "updated").
    pub fn event(&self) -> Option<&'static str> {
        match self {
            Self::Opened(_) => Some(EVENT_OPEN),
            Self::Updated(_) => Some(EVENT_UPDATED),
            Self::Unchanged(_) => None,
        }
    }
}

/// Which breaches [`crate::store::Store::list_breaches`] returns, newest opened first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BreachFilter {
    /// Only breaches in this state.
    pub state: Option<BreachState>,
    /// Only breaches of this rule.
    pub rule: Option<String>,
    /// Only breaches that were open at some time at or after this instant, Unix ms: open
    /// ones, and those resolved at or after it.
    pub since_unix_ms: Option<i64>,
    /// Most breaches.
    pub limit: u32,
}

/// A breach's identifier: the first 16 bytes, in hex, of SHA-256 over the length-prefixed
/// `rule`, `node`, `subject`, `opened_at_unix_ms` and the sequence number of its "open"
/// record. Deterministic, and unique because log sequence numbers are.
pub fn breach_id(
    rule: &str,
    node: &str,
    subject: &str,
    opened_at_unix_ms: i64,
    open_seq: u64,
) -> String {
    let d = digest_fields(&[
        BREACH_ID_DOMAIN.as_bytes(),
        rule.as_bytes(),
        node.as_bytes(),
        subject.as_bytes(),
        &opened_at_unix_ms.to_be_bytes(),
        &open_seq.to_be_bytes(),
    ]);
    hex(&d.as_ref()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use sov_evidence::chain::{GENESIS_HASH, verify_chain};

    fn obs(subject: &str, at: i64, evidence: Value) -> Observation {
        Observation {
            rule: "restricted-model-outside".into(),
            node: "gpu-1".into(),
            subject: subject.into(),
            severity: Severity::Critical,
            evidence,
            at_unix_ms: at,
        }
    }

    /// open, updated, resolved of one breach, and open of another.
    fn chain() -> Vec<LogRecord> {
        let mut out: Vec<LogRecord> = Vec::new();
        let mut push = |at: i64, b: &Breach, event: &str| {
            let prev = out.last().map(|r| (r.seq, r.hash.clone()));
            let r = b.log_record(&prev, at, event);
            out.push(r);
        };
        let mut b = Breach::opened(&obs("m", 1000, serde_json::json!({"bytes": 1})), 1);
        push(1000, &b, EVENT_OPEN);
        let stored = canonical_json(&b.evidence);
        assert!(b.fold(&obs("m", 2000, serde_json::json!({"bytes": 2})), &stored));
        push(2000, &b, EVENT_UPDATED);
        b.state = BreachState::Resolved;
        b.resolved_at_unix_ms = Some(9000);
        push(9000, &b, EVENT_RESOLVED);
        let other = Breach::opened(&obs("n", 9500, Value::Null), 4);
        push(9500, &other, EVENT_OPEN);
        out
    }

    #[test]
    fn severity_and_state_round_trip_their_names() {
        for s in [Severity::Info, Severity::Warning, Severity::Critical] {
            assert_eq!(s.as_str().parse::<Severity>().unwrap(), s);
        }
        for s in [BreachState::Open, BreachState::Resolved] {
            assert_eq!(s.as_str().parse::<BreachState>().unwrap(), s);
        }
        let err = "fatal".parse::<Severity>().unwrap_err().to_string();
        assert!(err.contains("fatal") && err.contains("critical"), "{err}");
        assert!(Severity::Critical > Severity::Info);
    }

    #[test]
    fn breach_ids_are_deterministic_and_distinct() {
        let a = breach_id("r", "n", "s", 1000, 1);
        assert_eq!(a, breach_id("r", "n", "s", 1000, 1));
        assert_eq!(a.len(), 32);
        assert_ne!(a, breach_id("r", "n", "s", 1000, 2));
        assert_ne!(a, breach_id("r", "ns", "", 1000, 1));
    }

    #[test]
    fn folding_reports_a_change_only_for_new_severity_or_evidence() {
        let mut b = Breach::opened(&obs("m", 1000, serde_json::json!({"a": 1, "b": 2})), 1);
        let stored = canonical_json(&b.evidence);
        // Same evidence, keys in another order: unchanged.
        let same: Value = serde_json::from_str(r#"{"b":2,"a":1}"#).unwrap();
        assert!(!b.fold(&obs("m", 3000, same), &stored));
        assert_eq!((b.count, b.last_seen_unix_ms), (2, 3000));
        // An older observation does not move last seen back.
        assert!(!b.fold(&obs("m", 2000, b.evidence.clone()), &stored));
        assert_eq!((b.count, b.last_seen_unix_ms), (3, 3000));
        let mut o = obs("m", 4000, b.evidence.clone());
        o.severity = Severity::Warning;
        assert!(b.fold(&o, &stored));
        assert_eq!(b.severity, Severity::Warning);
    }

    #[test]
    fn counters_change_the_breach_row_but_make_no_log_record() {
        let first = serde_json::json!({"country": "FR", "counters": {"bytes_sent": 10}});
        let mut b = Breach::opened(&obs("m", 1000, first), 1);
        let stored = canonical_json(&b.evidence);
        let more = serde_json::json!({"country": "FR", "counters": {"bytes_sent": 99}});
        assert!(!b.fold(&obs("m", 2000, more), &stored));
        assert_eq!(b.evidence["counters"]["bytes_sent"], 99);
        let stored = canonical_json(&b.evidence);
        let elsewhere = serde_json::json!({"country": "DE", "counters": {"bytes_sent": 99}});
        assert!(b.fold(&obs("m", 3000, elsewhere), &stored));
    }

    #[test]
    fn a_sound_chain_verifies() {
        let records = chain();
        assert_eq!(verify_chain(records.clone().into_iter()), Ok(4));
        assert_eq!(verify_chain(std::iter::empty()), Ok(0));
        assert_eq!(records[0].prev_hash, GENESIS_HASH);
        assert_eq!(records[1].prev_hash, records[0].hash);
        assert_eq!(records[2].body["state"], "resolved");
        // Records read back from a store verify the same.
        let stored: Vec<LogRecord> = records
            .iter()
            .map(|r| {
                LogRecord::from_stored(
                    r.seq,
                    r.at_unix_ms,
                    r.breach_id.clone(),
                    r.event.clone(),
                    r.body_json.clone(),
                    r.prev_hash.clone(),
                    r.hash.clone(),
                )
            })
            .collect();
        assert_eq!(stored, records);
        assert_eq!(verify_chain(stored.into_iter()), Ok(4));
    }

    #[test]
    fn a_changed_body_names_its_record() {
        let mut records = chain();
        records[1].body_json = records[1].body_json.replace("\"bytes\":2", "\"bytes\":3");
        let err = verify_chain(records.into_iter()).unwrap_err();
        assert_eq!(err.seq, 2, "{err}");
        assert!(err.reason.contains("does not match its contents"), "{err}");
    }

    #[test]
    fn a_rehashed_record_breaks_the_next_link() {
        let mut records = chain();
        records[1].event = "resolved".into();
        records[1].hash = records[1].compute_hash();
        let err = verify_chain(records.into_iter()).unwrap_err();
        assert_eq!(err.seq, 3, "{err}");
        assert!(
            err.reason.contains("does not match record 2's hash"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_first_link_is_named() {
        let mut records = chain();
        records[0].prev_hash = "f".repeat(64);
        let err = verify_chain(records.into_iter()).unwrap_err();
        assert_eq!(err.seq, 1);
        assert!(err.reason.contains("genesis"), "{err}");
    }

    #[test]
    fn a_missing_record_is_named() {
        let mut records = chain();
        records.remove(1);
        let err = verify_chain(records.clone().into_iter()).unwrap_err();
        assert_eq!(err.seq, 2, "{err}");
        assert!(err.reason.contains("missing"), "{err}");
        // Two missing, and the first one missing.
        records.remove(1);
        let err = verify_chain(records.into_iter()).unwrap_err();
        assert_eq!(err.seq, 2, "{err}");
        assert!(err.reason.contains("records 2 to 3 missing"), "{err}");
        let err = verify_chain(chain().into_iter().skip(1)).unwrap_err();
        assert_eq!(err.seq, 1, "{err}");
    }

    #[test]
    fn a_repeated_record_is_out_of_order() {
        let mut records = chain();
        records.insert(2, records[1].clone());
        let err = verify_chain(records.into_iter()).unwrap_err();
        assert_eq!(err.seq, 2, "{err}");
        assert!(err.reason.contains("expected record 3"), "{err}");
    }

    #[test]
    fn a_body_that_is_not_json_reads_back_as_null_and_fails() {
        let r = &chain()[0];
        let bad = LogRecord::from_stored(
            1,
            r.at_unix_ms,
            r.breach_id.clone(),
            r.event.clone(),
            "{not json".into(),
            r.prev_hash.clone(),
            r.hash.clone(),
        );
        assert_eq!(bad.body, Value::Null);
        assert_eq!(verify_chain(std::iter::once(bad)).unwrap_err().seq, 1);
    }
}
