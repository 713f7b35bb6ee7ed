//! The two hash-chained logs a store keeps, the breach log and the audit log: one table shape,
//! described once ([`ChainedLog`]) and appended to and read by one function per backend
//! (`append_chained`, `read_chained` in `sqlite/breaches.rs` and `postgres/breaches.rs`), then
//! verified page by page ([`sov_evidence::chain`] holds the chain itself).

use sov_evidence::audit::AuditRecord;
use sov_evidence::chain::{LogRecord, LogVerdict};
use sov_evidence::checkpoint::Anchors;

use super::{Store, StoreError};

/// One chained log's table: `seq, at_ms, <key>, <event>, body, prev_hash, hash`, append-only.
/// The statements use `$n` parameters, which both SQLite and PostgreSQL bind by position.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChainedLog {
    /// What a failure to read the last record says.
    pub reading_last: &'static str,
    /// What a failure to append says.
    pub appending: &'static str,
    /// What a failure to read records says.
    pub reading: &'static str,
    /// `(seq, hash)` of the last record.
    pub last: &'static str,
    /// Insert one record: `$1..$7` = seq, at_ms, key, event, body, prev_hash, hash.
    pub append: &'static str,
    /// Records after `$1`, in order, at most `$2`, read by [`super::rows::log_record`].
    pub read: &'static str,
}

/// The statements of a chained log named `$table` whose key and event columns are `$key` and
/// `$event`.
macro_rules! chained_log {
    ($what:literal, $table:literal, $key:literal, $event:literal) => {
        ChainedLog {
            reading_last: concat!("read last ", $what, " record"),
            appending: concat!("append ", $what),
            reading: concat!("read ", $what),
            last: concat!(
                "SELECT seq, hash FROM ",
                $table,
                " ORDER BY seq DESC LIMIT 1"
            ),
            append: concat!(
                "INSERT INTO ",
                $table,
                " (seq, at_ms, ",
                $key,
                ", ",
                $event,
                ", body, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ),
            read: concat!(
                "SELECT seq, at_ms, ",
                $key,
                ", ",
                $event,
                ", body, prev_hash, hash FROM ",
                $table,
                " WHERE seq > $1 ORDER BY seq LIMIT $2"
            ),
        }
    };
}

/// Every state change of every breach ([`crate::breach`]).
pub(crate) const BREACH_LOG: ChainedLog =
    chained_log!("breach log", "breach_log", "breach_id", "event");
/// Every query of a regulator or admin ([`sov_evidence::audit`]): the actor in the key
/// column, the call in the event column.
pub(crate) const AUDIT_LOG: ChainedLog = chained_log!("audit log", "audit_log", "actor", "call");

/// The chained log named `log` ([`sov_evidence::checkpoint::BREACH_LOG`] or
/// [`sov_evidence::checkpoint::AUDIT_LOG`]).
pub(crate) fn chained_log(log: &str) -> Result<&'static ChainedLog, StoreError> {
    match log {
        sov_evidence::checkpoint::BREACH_LOG => Ok(&BREACH_LOG),
        sov_evidence::checkpoint::AUDIT_LOG => Ok(&AUDIT_LOG),
        other => Err(StoreError::Range(format!("no chained log named {other:?}"))),
    }
}

/// Records read per page by [`verify_store_log`] and [`verify_pages`]'s other callers.
pub const VERIFY_PAGE: u32 = 1000;

/// Check a hash chain read page by page: `page(after_seq)` gives the records after
/// `after_seq` (empty at the end). Used for the breach log and the audit log.
pub async fn verify_pages<F, Fut>(page: F) -> Result<LogVerdict, StoreError>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<LogRecord>, StoreError>>,
{
    verify_pages_anchored(page, &mut Anchors::none()).await
}

/// [`verify_pages`], showing every verified record to `anchors` (signed checkpoints; a
/// mismatch is the verdict's broken record). The caller ends with [`Anchors::finish`].
pub async fn verify_pages_anchored<F, Fut>(
    mut page: F,
    anchors: &mut Anchors,
) -> Result<LogVerdict, StoreError>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<LogRecord>, StoreError>>,
{
    let mut v = sov_evidence::chain::ChainVerifier::new();
    let mut after = 0;
    loop {
        let records = page(after).await?;
        let Some(last) = records.last() else { break };
        after = last.seq;
        for r in &records {
            if let Err(e) = v.push(r).and_then(|()| anchors.record(r.seq, &r.hash)) {
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
pub async fn verify_store_log(store: &dyn Store) -> Result<LogVerdict, StoreError> {
    verify_store_chain(
        store,
        sov_evidence::checkpoint::BREACH_LOG,
        &mut Anchors::none(),
    )
    .await
}

/// Read a store's whole audit log page by page and check its chain.
pub async fn verify_store_audit(store: &dyn Store) -> Result<LogVerdict, StoreError> {
    verify_store_chain(
        store,
        sov_evidence::checkpoint::AUDIT_LOG,
        &mut Anchors::none(),
    )
    .await
}

/// Read the chained log `log` of a store page by page and check its chain and `anchors`.
pub async fn verify_store_chain(
    store: &dyn Store,
    log: &str,
    anchors: &mut Anchors,
) -> Result<LogVerdict, StoreError> {
    if chained_log(log)?.append == AUDIT_LOG.append {
        verify_pages_anchored(
            |after| async move {
                let page = store.audit_log(after, VERIFY_PAGE).await?;
                Ok(page.iter().map(AuditRecord::as_log_record).collect())
            },
            anchors,
        )
        .await
    } else {
        verify_pages_anchored(|after| store.breach_log(after, VERIFY_PAGE), anchors).await
    }
}
