//! Every refused call to the query API leaves a trace: who (the certificate's name, the token's
//! id, or "unknown" with the peer's address), how (`grpc`, `https-cert`, `https-token`,
//! `https`), the call and why, as a record in the audit log (outcome `refused: …`) and a log
//! line. Records are rate-limited so a flood of refused calls cannot fill the disk: at most
//! [`MAX_RECORDED_PER_MINUTE`] a minute; the rest are counted, and the count is recorded as
//! one record when the next minute begins.

use std::sync::{Arc, Mutex, PoisonError};

use serde_json::json;
use sov_evidence::audit::AuditEntry;

use crate::store::Store;

/// Most refusals recorded (audit log and log line) in one minute.
pub const MAX_RECORDED_PER_MINUTE: u64 = 60;

/// One refused call.
#[derive(Debug, Clone)]
pub struct Refusal<'a> {
    /// Who asked: a certificate's name, `token:<id>`, or "unknown".
    pub who: &'a str,
    /// The role claimed or proven ("" when none).
    pub role: &'a str,
    /// How: `grpc`, `https-cert`, `https-token` or `https`.
    pub via: &'a str,
    /// The call (`ListNodes`, ...) or the HTTPS route.
    pub call: &'a str,
    /// Why it was refused.
    pub why: &'a str,
    /// The peer's address, when known.
    pub peer: Option<std::net::SocketAddr>,
}

/// The rate-limited record of refusals.
#[derive(Debug, Default)]
pub struct RefusalLog {
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    minute: i64,
    recorded: u64,
    suppressed: u64,
}

impl RefusalLog {
    /// Record `r` in `store`'s audit log and the log, unless this minute's share is spent.
    pub async fn record(&self, store: &Arc<dyn Store>, r: Refusal<'_>, now_unix_ms: i64) {
        let minute = now_unix_ms.div_euclid(60_000);
        let (record, carried) = {
            let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
            let mut carried = 0;
            if w.minute != minute {
                carried = w.suppressed;
                *w = Window {
                    minute,
                    recorded: 0,
                    suppressed: 0,
                };
            }
            if w.recorded < MAX_RECORDED_PER_MINUTE {
                w.recorded += 1;
                (true, carried)
            } else {
                w.suppressed += 1;
                (false, carried)
            }
        };
        if carried > 0 {
            tracing::warn!(
                refusals = carried,
                "refused calls not recorded one by one in the previous minute (rate limit)"
            );
            let entry = AuditEntry {
                at_unix_ms: now_unix_ms,
                who: "collector".into(),
                role: String::new(),
                via: String::new(),
                call: "refusals-not-recorded".into(),
                params: json!({ "count": carried, "limit_per_minute": MAX_RECORDED_PER_MINUTE }),
                rows: 0,
                outcome: format!("refused: {carried} more refused calls in the previous minute"),
            };
            if let Err(err) = store.append_audit(entry).await {
                tracing::error!(error = %err, "cannot record the count of refusals");
            }
        }
        if !record {
            return;
        }
        let peer = r.peer.map(|p| p.to_string()).unwrap_or_default();
        tracing::warn!(
            who = r.who,
            role = r.role,
            via = r.via,
            call = r.call,
            peer.addr = %peer,
            why = r.why,
            "query refused"
        );
        let mut why: String = r.why.chars().take(500).collect();
        if why.len() < r.why.len() {
            why.push('…');
        }
        let entry = AuditEntry {
            at_unix_ms: now_unix_ms,
            who: r.who.chars().take(200).collect(),
            role: r.role.to_owned(),
            via: r.via.to_owned(),
            call: r.call.chars().take(100).collect(),
            params: json!({ "peer": peer }),
            rows: 0,
            outcome: format!("refused: {why}"),
        };
        if let Err(err) = store.append_audit(entry).await {
            tracing::error!(error = %err, "cannot record a refused call in the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refusals_are_recorded_up_to_the_limit_then_counted_in_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        let log = RefusalLog::default();
        let r = Refusal {
            who: "unknown",
            role: "",
            via: "https",
            call: "nodes",
            why: "unknown token",
            peer: None,
        };
        for _ in 0..MAX_RECORDED_PER_MINUTE + 40 {
            log.record(&store, r.clone(), 60_000).await;
        }
        let records = store.audit_log(0, 1000).await.unwrap();
        assert_eq!(records.len() as u64, MAX_RECORDED_PER_MINUTE);
        log.record(&store, r, 120_000).await;
        let records = store.audit_log(0, 1000).await.unwrap();
        assert_eq!(records.len() as u64, MAX_RECORDED_PER_MINUTE + 2);
        let summary = &records[MAX_RECORDED_PER_MINUTE as usize];
        assert_eq!(summary.call, "refusals-not-recorded");
        assert!(
            summary.body_json.contains("40 more refused calls"),
            "{summary:?}"
        );
    }
}
