//! The two hash-chained logs a store keeps, the breach log and the audit log, read back and
//! verified page by page ([`sov_evidence::chain`] holds the chain itself).

use sov_evidence::audit::AuditRecord;
use sov_evidence::chain::{LogRecord, LogVerdict};

use super::{Store, StoreError};

/// Records read per page by [`verify_store_log`] and [`verify_pages`]'s other callers.
pub const VERIFY_PAGE: u32 = 1000;

/// Check a hash chain read page by page: `page(after_seq)` gives the records after
/// `after_seq` (empty at the end). Used for the breach log and the audit log.
pub async fn verify_pages<F, Fut>(mut page: F) -> Result<LogVerdict, StoreError>
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
pub async fn verify_store_log(store: &dyn Store) -> Result<LogVerdict, StoreError> {
    verify_pages(|after| store.breach_log(after, VERIFY_PAGE)).await
}

/// Read a store's whole audit log page by page and check its chain.
pub async fn verify_store_audit(store: &dyn Store) -> Result<LogVerdict, StoreError> {
    verify_pages(|after| async move {
        let page = store.audit_log(after, VERIFY_PAGE).await?;
        Ok(page.iter().map(AuditRecord::as_log_record).collect())
    })
    .await
}
