//! The outbox: every breach state change reaches every sink routed to it, once, in order,
//! even while the receiver is down or the collector restarts.
//!
//! The breach log is the source of truth. One [`SinkWorker`] per configured sink:
//!
//! 1. holds the sink's lease (`alert:<sink>`, [`LEASE_TTL`]) in the store, so that among
//!    several collector replicas on one PostgreSQL exactly one delivers to each sink;
//! 2. **enqueues**: reads the log records after the sink's cursor, keeps those the sink's
//!    routing accepts, and inserts one outbox row per (sink, log record) together with the
//!    new cursor in one transaction (a row already there is kept: enqueueing is idempotent);
//! 3. **delivers** the sink's oldest pending row with [`super::attempt`]: delivered → the
//!    row is marked delivered and the next one goes; a retryable failure → the row waits for
//!    [`super::retry_delay`] (capped by `[alert] retry_max_secs`) and the rows behind it wait
//!    too (a receiver sees a breach's open before its resolution); a refusal (4xx) → the row
//!    is marked failed with the error and the next one goes.
//!
//! A sink seen for the first time starts at the end of the log: adding a sink to a running
//! installation does not replay its history. A delivery whose outcome could not be recorded
//! (the process died between the receiver's answer and the commit) is delivered again after
//! a restart; every alert carries its log `seq`, unique per state change, for receivers that
//! must drop such a repeat.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Alert, Attempt, Sink};
use crate::store::{OutboxItem, Settle, Store, StoreError};
use sov_evidence::chain::LogRecord;
use sov_evidence::view::rfc3339;

/// How long a sink's lease lasts without renewal (a crashed replica's sinks move to another
/// replica after this).
pub const LEASE_TTL: Duration = Duration::from_secs(30);
/// How often a worker looks for new log records when nothing woke it.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// Log records read per enqueue step.
const ENQUEUE_BATCH: u32 = 500;

/// Builds the [`Alert`] of one breach log record (its body is the breach's snapshot).
pub fn alert_of(record: &LogRecord) -> Alert {
    let b = &record.body;
    let text = |k: &str| b.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    let ms = |k: &str| b.get(k).and_then(serde_json::Value::as_i64);
    Alert {
        seq: record.seq,
        breach_id: record.breach_id.clone(),
        rule: text("rule"),
        state: record.event.clone(),
        severity: text("severity"),
        node: text("node"),
        subject: text("subject"),
        evidence: b
            .get("evidence")
            .cloned()
            .unwrap_or(serde_json::Value::Null),
        at: rfc3339(record.at_unix_ms),
        opened_at: rfc3339(ms("opened_at_unix_ms").unwrap_or(record.at_unix_ms)),
        resolved_at: ms("resolved_at_unix_ms").map(rfc3339),
        checkpoint: None,
    }
}

/// The outbox items for `sink` among `records`, in log order.
pub fn items_for(sink: &dyn Sink, records: &[LogRecord]) -> Vec<OutboxItem> {
    records
        .iter()
        .filter_map(|r| {
            let a = alert_of(r);
            if !sink.accepts(&a) {
                return None;
            }
            Some(OutboxItem {
                log_seq: r.seq,
                breach_id: r.breach_id.clone(),
                event: r.event.clone(),
                payload: serde_json::to_string(&a).ok()?,
            })
        })
        .collect()
}

/// Delivers the outbox of one sink (see the module documentation).
#[derive(Debug)]
pub struct SinkWorker {
    sink: Arc<dyn Sink>,
    store: Arc<dyn Store>,
    holder: String,
    retry_max: Duration,
}

impl SinkWorker {
    /// A worker for `sink`; `holder` names this collector process in leases.
    pub fn new(
        sink: Arc<dyn Sink>,
        store: Arc<dyn Store>,
        holder: String,
        retry_max: Duration,
    ) -> Self {
        Self {
            sink,
            store,
            holder,
            retry_max,
        }
    }

    fn lease_name(&self) -> String {
        format!("alert:{}", self.sink.name())
    }

    /// Move the cursor forward, enqueueing what the sink accepts. Returns how many log records
    /// were read.
    pub async fn enqueue(&self, now_unix_ms: i64) -> Result<usize, StoreError> {
        let name = self.sink.name();
        let cursor = match self.store.outbox_cursor(name).await? {
            Some(c) => c,
            None => {
                // First sight of this sink: start at the end of the log.
                let end = self.store.breach_log_end().await?;
                self.store
                    .outbox_enqueue(name, Vec::new(), end, now_unix_ms)
                    .await?;
                tracing::info!(
                    sink = name,
                    after_seq = end,
                    "alert sink starts at the end of the breach log"
                );
                end
            }
        };
        let records = self.store.breach_log(cursor, ENQUEUE_BATCH).await?;
        let Some(last) = records.last().map(|r| r.seq) else {
            return Ok(0);
        };
        let items = items_for(self.sink.as_ref(), &records);
        self.store
            .outbox_enqueue(name, items, last, now_unix_ms)
            .await?;
        Ok(records.len())
    }

    /// Try the sink's due rows in order until one must wait. Returns how many were settled.
    pub async fn deliver_due(&self) -> Result<usize, StoreError> {
        let name = self.sink.name();
        let mut settled = 0;
        while let Some(row) = self.store.outbox_head(name).await? {
            let now = sov_common::clock::now_unix_ms();
            if row.next_attempt_unix_ms > now {
                break;
            }
            let mut alert: Alert =
                match serde_json::from_str::<serde_json::Value>(&row.item.payload) {
                    Ok(v) => alert_from_json(&v),
                    Err(e) => {
                        let settle = Settle::Failed {
                            attempts: row.attempts.saturating_add(1),
                            at_unix_ms: now,
                            error: format!("stored payload is not JSON: {e}"),
                        };
                        self.store
                            .outbox_settle(name, row.item.log_seq, settle)
                            .await?;
                        settled += 1;
                        continue;
                    }
                };
            // The latest signed checkpoint at the time of sending (not of enqueueing).
            let checkpoint = crate::checkpoint::latest_json(
                self.store.as_ref(),
                sov_evidence::checkpoint::BREACH_LOG,
            )
            .await;
            alert.checkpoint = (!checkpoint.is_null()).then_some(checkpoint);
            let outcome = super::attempt(self.sink.as_ref(), &alert, row.attempts).await;
            let now = sov_common::clock::now_unix_ms();
            let settle = match outcome {
                Attempt::Delivered => Settle::Delivered { at_unix_ms: now },
                Attempt::Retry { error, after } => Settle::Retry {
                    attempts: row.attempts.saturating_add(1),
                    next_attempt_unix_ms: now
                        + i64::try_from(after.min(self.retry_max).as_millis()).unwrap_or(i64::MAX),
                    error: sov_common::error::error_line(&error),
                },
                Attempt::Failed(error) => Settle::Failed {
                    attempts: row.attempts.saturating_add(1),
                    at_unix_ms: now,
                    error: sov_common::error::error_line(&error),
                },
            };
            let wait = matches!(settle, Settle::Retry { .. });
            self.store
                .outbox_settle(name, row.item.log_seq, settle)
                .await?;
            settled += 1;
            if wait {
                break;
            }
        }
        Ok(settled)
    }

    /// One round: take or renew the lease; when held, enqueue everything new and deliver what
    /// is due. Returns whether this process holds the sink.
    pub async fn round(&self) -> Result<bool, StoreError> {
        let now = sov_common::clock::now_unix_ms();
        let ttl = i64::try_from(LEASE_TTL.as_millis()).unwrap_or(i64::MAX);
        if !self
            .store
            .take_lease(&self.lease_name(), &self.holder, now, ttl)
            .await?
        {
            return Ok(false);
        }
        while self.enqueue(sov_common::clock::now_unix_ms()).await? == ENQUEUE_BATCH as usize {}
        self.deliver_due().await?;
        Ok(true)
    }

    /// Run rounds until `shutdown`: after each, wait for `wake` (a new log record) or
    /// [`POLL_EVERY`], or until the head row's retry time.
    pub async fn run(self, mut wake: watch::Receiver<u64>, shutdown: CancellationToken) {
        loop {
            if let Err(err) = self.round().await {
                tracing::warn!(sink = self.sink.name(), error = %err, "alert outbox round failed; will retry");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = wake.changed() => {}
                () = tokio::time::sleep(POLL_EVERY) => {}
            }
        }
    }
}

/// An [`Alert`] back from its stored JSON.
fn alert_from_json(v: &serde_json::Value) -> Alert {
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
    Alert {
        seq: v
            .get("seq")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
        breach_id: text("breach_id"),
        rule: text("rule"),
        state: text("state"),
        severity: text("severity"),
        node: text("node"),
        subject: text("subject"),
        evidence: v
            .get("evidence")
            .cloned()
            .unwrap_or(serde_json::Value::Null),
        at: text("at"),
        opened_at: text("opened_at"),
        resolved_at: v
            .get("resolved_at")
            .and_then(|x| x.as_str())
            .map(str::to_owned),
        checkpoint: None,
    }
}

/// A name for this collector process in leases: host name, process id and a random suffix.
pub fn holder_id() -> String {
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "{host}/{}/{:08x}",
        std::process::id(),
        super::random_u64() as u32
    )
}

/// Start one [`SinkWorker`] per sink; their handles, for a shutdown to await.
pub fn spawn_workers(
    sinks: &[Arc<dyn Sink>],
    store: &Arc<dyn Store>,
    holder: &str,
    retry_max: Duration,
    wake: &watch::Receiver<u64>,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    sinks
        .iter()
        .map(|sink| {
            let worker = SinkWorker::new(sink.clone(), store.clone(), holder.to_owned(), retry_max);
            tokio::spawn(worker.run(wake.clone(), shutdown.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::breach::{Breach, Observation, Severity};

    #[test]
    fn an_alert_is_built_from_a_log_record_with_rfc3339_times() {
        let b = Breach::opened(
            &Observation {
                rule: "foreign-egress".into(),
                node: "n1".into(),
                subject: "country:FR".into(),
                severity: Severity::Critical,
                evidence: serde_json::json!({"country": "FR"}),
                at_unix_ms: 1_700_000_000_000,
            },
            7,
        );
        let r = b.log_record(&Some((6, "ab".to_owned())), 1_700_000_000_500, "open");
        let a = alert_of(&r);
        assert_eq!(a.seq, 7);
        assert_eq!(a.state, "open");
        assert_eq!(a.rule, "foreign-egress");
        assert_eq!(a.severity, "critical");
        assert_eq!(a.subject, "country:FR");
        assert_eq!(a.evidence["country"], "FR");
        assert_eq!(a.at, "2023-11-14T22:13:20.5Z");
        assert_eq!(a.opened_at, "2023-11-14T22:13:20Z");
        assert_eq!(a.resolved_at, None);
        let back = alert_from_json(&serde_json::to_value(&a).unwrap());
        assert_eq!(back, a);
    }
}
