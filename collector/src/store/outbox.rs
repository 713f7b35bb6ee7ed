//! The alert outbox's rows: one per (sink, breach log record), written and settled by the
//! alert workers ([`crate::alert::outbox`]) through [`super::Store`].

/// One outbox row to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// Sequence number of the breach log record.
    pub log_seq: u64,
    /// The breach.
    pub breach_id: String,
    /// "open", "updated" or "resolved".
    pub event: String,
    /// The alert as JSON, exactly as delivered.
    pub payload: String,
}

/// One stored outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Sink name.
    pub sink: String,
    /// The row as enqueued.
    pub item: OutboxItem,
    /// Failed tries so far.
    pub attempts: u32,
    /// Not before this time.
    pub next_attempt_unix_ms: i64,
    /// When it was enqueued.
    pub created_unix_ms: i64,
}

/// What one try did to a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Delivered at this time.
    Delivered {
        /// When.
        at_unix_ms: i64,
    },
    /// Failed; try again.
    Retry {
        /// Failed tries so far, this one included.
        attempts: u32,
        /// When to try again.
        next_attempt_unix_ms: i64,
        /// Why it failed.
        error: String,
    },
    /// Refused by the receiver; never tried again.
    Failed {
        /// Failed tries, this one included.
        attempts: u32,
        /// When.
        at_unix_ms: i64,
        /// Why.
        error: String,
    },
}

/// Outbox counters of one sink.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Sink name.
    pub sink: String,
    /// Rows waiting for delivery.
    pub pending: u64,
    /// Rows delivered.
    pub delivered: u64,
    /// Rows refused for good.
    pub failed: u64,
    /// Failed tries over all rows (retries included).
    pub failed_attempts: u64,
}
