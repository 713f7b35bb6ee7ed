//! Policy breaches and their tamper-evident log.
//!
//! A rule reports an [`Observation`] each time it evaluates and finds a violation. The store
//! ([`crate::store::Store::observe_breach`]) folds it into the one open [`Breach`] of its
//! `(rule, node, subject)`, opening one when there is none; a breach whose rule has not seen
//! it for the quiet period is resolved ([`crate::store::Store::resolve_quiet_breaches`]).
//!
//! Every state change is appended, in the same transaction, to the breach log: one
//! [`LogRecord`] per change, carrying a snapshot of the breach and the hash of the previous
//! record ([`record_hash`]), starting from [`GENESIS_HASH`]. [`verify_chain`] recomputes the
//! chain and names the first record that does not fit. The chain proves that no record was
//! edited, inserted or removed *before the last one*; cutting records off the end leaves a
//! valid shorter chain, so keep the last hash that `sov-collector verify-log` prints somewhere
//! else (a ticket, a regulator's mailbox) to detect that too.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Log event of a newly opened breach.
pub const EVENT_OPEN: &str = "open";
/// Log event of an open breach whose severity or evidence changed.
pub const EVENT_UPDATED: &str = "updated";
/// Log event of a breach resolved after its quiet period.
pub const EVENT_RESOLVED: &str = "resolved";

/// Domain separation of [`record_hash`]: a version change here changes every hash.
const RECORD_HASH_DOMAIN: &str = "sovereign.breach-log.v1";
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

/// One record of the breach log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// Position in the log, from 1, without holes.
    pub seq: u64,
    /// When the change happened, Unix ms (the observation's time, or the resolution's).
    pub at_unix_ms: i64,
    /// The breach that changed.
    pub breach_id: String,
    /// "open", "updated" or "resolved".
    pub event: String,
    /// The breach after the change ([`Breach::snapshot`]), parsed from `body_json`.
    pub body: Value,
    /// The body exactly as stored and hashed ([`canonical_json`]). The hash covers this text,
    /// not a re-serialisation of `body` (a float may not survive a JSON round trip bit for
    /// bit).
    pub body_json: String,
    /// Hash of the previous record; [`GENESIS_HASH`] for the first.
    pub prev_hash: String,
    /// [`record_hash`] of this record.
    pub hash: String,
}

impl LogRecord {
    /// The record that follows `prev` (`(seq, hash)` of the log's last record; `None` for an
    /// empty log), for `breach` after `event`.
    pub fn next(prev: Option<(u64, &str)>, at_unix_ms: i64, breach: &Breach, event: &str) -> Self {
        let (seq, prev_hash) = match prev {
            Some((seq, hash)) => (seq.saturating_add(1), hash.to_owned()),
            None => (1, GENESIS_HASH.to_owned()),
        };
        let body = breach.snapshot();
        let body_json = canonical_json(&body);
        let hash = record_hash(
            seq,
            at_unix_ms,
            &breach.breach_id,
            event,
            &body_json,
            &prev_hash,
        );
        Self {
            seq,
            at_unix_ms,
            breach_id: breach.breach_id.clone(),
            event: event.to_owned(),
            body,
            body_json,
            prev_hash,
            hash,
        }
    }

    /// A record read back from a store; `body` is `body_json` parsed (`null` when it is not
    /// JSON, which only a tampered database holds; the hash check then fails).
    pub fn from_stored(
        seq: u64,
        at_unix_ms: i64,
        breach_id: String,
        event: String,
        body_json: String,
        prev_hash: String,
        hash: String,
    ) -> Self {
        Self {
            seq,
            at_unix_ms,
            breach_id,
            event,
            body: serde_json::from_str(&body_json).unwrap_or(Value::Null),
            body_json,
            prev_hash,
            hash,
        }
    }

    /// [`record_hash`] of this record's fields as they are now.
    pub fn compute_hash(&self) -> String {
        record_hash(
            self.seq,
            self.at_unix_ms,
            &self.breach_id,
            &self.event,
            &self.body_json,
            &self.prev_hash,
        )
    }
}

/// `v` as compact JSON with every object's keys in byte order, whatever map type serde_json
/// was built with (with `preserve_order`, insertion order would leak into hashes otherwise).
/// Strings, numbers and literals are written by serde_json.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 over length-prefixed fields: each is its length as 8 bytes big-endian, then its
/// bytes, so that no two different field lists encode alike.
fn digest_fields(fields: &[&[u8]]) -> ring::digest::Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for f in fields {
        ctx.update(&(f.len() as u64).to_be_bytes());
        ctx.update(f);
    }
    ctx.finish()
}

/// The hash of one log record: lowercase hex SHA-256 over the length-prefixed fields
/// `"sovereign.breach-log.v1"`, `seq` (8 bytes big-endian), `at_unix_ms` (8 bytes
/// big-endian, two's complement), `breach_id`, `event`, `canonical_body_json` (UTF-8, as
/// [`canonical_json`] writes it) and `prev_hash` (its 64 hex characters).
pub fn record_hash(
    seq: u64,
    at_unix_ms: i64,
    breach_id: &str,
    event: &str,
    canonical_body_json: &str,
    prev_hash: &str,
) -> String {
    hex(digest_fields(&[
        RECORD_HASH_DOMAIN.as_bytes(),
        &seq.to_be_bytes(),
        &at_unix_ms.to_be_bytes(),
        breach_id.as_bytes(),
        event.as_bytes(),
        canonical_body_json.as_bytes(),
        prev_hash.as_bytes(),
    ])
    .as_ref())
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

/// The first record of a log that does not fit the chain, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {seq}: {reason}")]
pub struct ChainError {
    /// Sequence number of the first bad record (for a missing record: the one missing).
    pub seq: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// Checks a log record by record, in order; for logs read page by page.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    checked: u64,
    last_hash: String,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainVerifier {
    /// A verifier expecting record 1.
    pub fn new() -> Self {
        Self {
            checked: 0,
            last_hash: GENESIS_HASH.to_owned(),
        }
    }

    /// Records checked so far.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// Hash of the last record checked ([`GENESIS_HASH`] before the first).
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// Check the next record: its sequence number follows the previous one, it links to the
    /// previous record's hash, and its own hash is right.
    pub fn push(&mut self, r: &LogRecord) -> Result<(), ChainError> {
        let expected = self.checked + 1;
        if r.seq != expected {
            return Err(if r.seq > expected {
                let last = r.seq - 1;
                ChainError {
                    seq: expected,
                    reason: if last == expected {
                        format!("record missing (the next stored record is {})", r.seq)
                    } else {
                        format!(
                            "records {expected} to {last} missing (the next stored record is {})",
                            r.seq
                        )
                    },
                }
            } else {
                ChainError {
                    seq: r.seq,
                    reason: format!("out of order: expected record {expected}"),
                }
            });
        }
        if r.prev_hash != self.last_hash {
            return Err(ChainError {
                seq: r.seq,
                reason: if expected == 1 {
                    format!(
                        "prev_hash {} is not the genesis hash (64 zeros)",
                        r.prev_hash
                    )
                } else {
                    format!(
                        "prev_hash {} does not match record {}'s hash {}",
                        r.prev_hash,
                        expected - 1,
                        self.last_hash
                    )
                },
            });
        }
        let computed = r.compute_hash();
        if r.hash != computed {
            return Err(ChainError {
                seq: r.seq,
                reason: format!(
                    "stored hash {} does not match its contents (computed {computed})",
                    r.hash
                ),
            });
        }
        self.checked = expected;
        self.last_hash.clone_from(&r.hash);
        Ok(())
    }
}

/// Check a whole log from record 1: how many records, or the first bad one.
pub fn verify_chain(records: impl Iterator<Item = LogRecord>) -> Result<u64, ChainError> {
    let mut v = ChainVerifier::new();
    for r in records {
        v.push(&r)?;
    }
    Ok(v.checked())
}

/// What `sov-collector verify-log` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogVerdict {
    /// Every record fits the chain.
    Verified {
        /// Records checked.
        records: u64,
        /// Hash of the last one ([`GENESIS_HASH`] for an empty log): keep it elsewhere to
        /// detect a log cut short later.
        last_hash: String,
    },
    /// The first record that does not fit.
    Broken(ChainError),
}

impl LogVerdict {
    /// `log verified: N records, last hash H` or `log broken at record SEQ: REASON`.
    pub fn message(&self) -> String {
        match self {
            Self::Verified { records, last_hash } => {
                format!("log verified: {records} records, last hash {last_hash}")
            }
            Self::Broken(e) => format!("log broken at record {}: {}", e.seq, e.reason),
        }
    }
}

/// Records read per page by [`verify_store_log`] and [`verify_pages`]'s other callers.
pub const VERIFY_PAGE: u32 = 1000;

/// Check a hash chain read page by page: `page(after_seq)` gives the records after
/// `after_seq` (empty at the end). Used for the breach log and the audit log.
pub async fn verify_pages<F, Fut>(mut page: F) -> Result<LogVerdict, crate::store::StoreError>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<LogRecord>, crate::store::StoreError>>,
{
    let mut v = ChainVerifier::new();
    let mut after = 0;
    loop {
        let records = page(after).await?;
        let Some(last) = records.last() else { break };
        after = last.seq;
        for r in &records {
            if let Err(e) = v.push(r) {
                return Ok(LogVerdict::Broken(e));
            }
        }
    }
    Ok(LogVerdict::Verified {
        records: v.checked(),
        last_hash: v.last_hash().to_owned(),
    })
}

/// Read a store's whole breach log page by page and check its chain.
pub async fn verify_store_log(
    store: &dyn crate::store::Store,
) -> Result<LogVerdict, crate::store::StoreError> {
    verify_pages(|after| store.breach_log(after, VERIFY_PAGE)).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let r = LogRecord::next(prev.as_ref().map(|(s, h)| (*s, h.as_str())), at, b, event);
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
    fn record_hash_is_stable() {
        // Pinned (computed independently with Python's hashlib over the documented
        // encoding): a change here breaks every stored log.
        assert_eq!(
            record_hash(1, 1000, "abc", "open", r#"{"a":1}"#, GENESIS_HASH),
            "215d2f3c9ef850bb79fe6e26ffde085c750bdae053448496c04ab409fbcafd6c"
        );
    }

    #[test]
    fn record_hash_changes_with_every_field_and_fields_do_not_run_together() {
        let base = record_hash(1, 1000, "abc", "open", "{}", GENESIS_HASH);
        for other in [
            record_hash(2, 1000, "abc", "open", "{}", GENESIS_HASH),
            record_hash(1, 1001, "abc", "open", "{}", GENESIS_HASH),
            record_hash(1, 1000, "abd", "open", "{}", GENESIS_HASH),
            record_hash(1, 1000, "abc", "updated", "{}", GENESIS_HASH),
            record_hash(1, 1000, "abc", "open", "[]", GENESIS_HASH),
            record_hash(1, 1000, "abc", "open", "{}", &"1".repeat(64)),
            // The same bytes split differently between two fields.
            record_hash(1, 1000, "abco", "pen", "{}", GENESIS_HASH),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth_and_has_no_spaces() {
        let v: Value = serde_json::from_str(
            r#"{ "b": [ {"z": 1, "a": "x\"y"} ], "a": null, "B": 1.5, "é": true }"#,
        )
        .unwrap();
        assert_eq!(
            canonical_json(&v),
            r#"{"B":1.5,"a":null,"b":[{"a":"x\"y","z":1}],"é":true}"#
        );
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

    #[tokio::test]
    async fn a_stores_log_is_verified_across_pages_and_a_break_is_named() {
        use crate::store::{SqliteStore, Store};
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let empty = verify_store_log(&store).await.unwrap();
        assert_eq!(
            empty.message(),
            format!("log verified: 0 records, last hash {GENESIS_HASH}")
        );
        // More records than one page.
        let n = i64::from(VERIFY_PAGE) + 5;
        for i in 0..n {
            store
                .observe_breach(obs("m", 1000 + i, serde_json::json!(i)))
                .await
                .unwrap();
        }
        let last = store
            .breach_log(u64::try_from(n - 1).unwrap(), 1)
            .await
            .unwrap();
        let verdict = verify_store_log(&store).await.unwrap();
        assert_eq!(
            verdict,
            LogVerdict::Verified {
                records: u64::try_from(n).unwrap(),
                last_hash: last[0].hash.clone()
            }
        );
        assert_eq!(
            verdict.message(),
            format!("log verified: {n} records, last hash {}", last[0].hash)
        );
        let c = rusqlite::Connection::open(dir.path().join(crate::store::sqlite::DB_FILE)).unwrap();
        c.execute_batch(
            "DROP TRIGGER breach_log_no_delete; DELETE FROM breach_log WHERE seq = 1002;",
        )
        .unwrap();
        let verdict = verify_store_log(&store).await.unwrap();
        assert_eq!(
            verdict.message(),
            "log broken at record 1002: record missing (the next stored record is 1003)"
        );
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
