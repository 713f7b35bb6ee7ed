//! Signed checkpoints of the breach log's and the audit log's heads ([`sov_evidence::checkpoint`]).
//!
//! The [`Checkpointer`] signs the head `(seq, hash)` of each log with the collector's key (the
//! TLS key that signs evidence reports) when the collector starts, every
//! `checkpoint_interval_secs` when the head moved, and once more at shutdown; the store keeps
//! every checkpoint. Every alert and evidence report carries the latest one, so checkpoints
//! also live outside the database. [`verify`] (`sov-collector verify-log`, `verify-audit`)
//! checks a log's chain and that it holds the signed hash at every signed seq: a log
//! rewritten with its hashes recomputed fails naming the checkpoint; a log cut short before a
//! signed seq fails as truncated; a log with records and no checkpoint at all fails (the
//! checkpoints were deleted).
//!
//! What it does not prove: records after the last checkpoint are covered by the hash chain
//! only (at most one interval of them while the collector runs, none after a clean
//! shutdown); whoever can delete rows can delete the newest checkpoints together with the
//! records they cover, which only a checkpoint kept elsewhere (`--checkpoint FILE`: an alert's
//! body, an evidence report) reveals.

use std::sync::Arc;
use std::time::Duration;

use sov_evidence::chain::{ChainError, LogVerdict};
use sov_evidence::checkpoint::{
    AUDIT_LOG, AnchorSummary, Anchors, BREACH_LOG, Checkpoint, SignedCheckpoint, Trust,
};
use sov_evidence::report::ReportSigner;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

/// Default seconds between two checkpoints of a log whose head moved.
pub const DEFAULT_CHECKPOINT_INTERVAL_SECS: u64 = 60;
/// The logs that are checkpointed.
pub const LOGS: [&str; 2] = [BREACH_LOG, AUDIT_LOG];
/// Checkpoints read per page when verifying.
const PAGE: u32 = 1000;

/// Signs the logs' heads ([`Checkpointer::run`]).
#[derive(Debug, Clone)]
pub struct Checkpointer {
    /// Where the logs and the checkpoints are.
    pub store: Arc<dyn Store>,
    /// The collector's key.
    pub signer: Arc<ReportSigner>,
    /// Between two checkpoints.
    pub interval: Duration,
}

impl Checkpointer {
    /// Sign the head of each log that no checkpoint holds yet; how many were signed.
    pub async fn sign_heads(&self) -> Result<usize, StoreError> {
        let mut signed = 0;
        for log in LOGS {
            let (seq, hash) = self.store.chain_head(log).await?;
            let latest = self
                .store
                .latest_checkpoint(log)
                .await?
                .and_then(|t| SignedCheckpoint::from_text(&t).ok())
                .map(|c| c.checkpoint.seq);
            if latest.is_some_and(|l| l >= seq) {
                continue;
            }
            let at = sov_common::clock::now_unix_ms();
            let cp = SignedCheckpoint::sign(
                &self.signer,
                Checkpoint {
                    log: log.to_owned(),
                    seq,
                    hash: hash.clone(),
                    at_unix_ms: at,
                },
            )
            .map_err(|e| StoreError::Task(format!("signing a checkpoint failed: {e}")))?;
            self.store
                .add_checkpoint(log, seq, &hash, at, &cp.to_text())
                .await?;
            tracing::debug!(log, seq, "chain head signed");
            signed += 1;
        }
        Ok(signed)
    }

    /// Sign the heads now, then every interval, until `stop` (the last checkpoint at shutdown
    /// is [`crate::app::Running::serve`]'s, awaited before the process ends).
    pub async fn run(self, stop: CancellationToken) {
        loop {
            if let Err(err) = self.sign_heads().await {
                tracing::warn!(error = %err, "cannot sign the chained logs' heads; will retry");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The chain holds and matches every checkpoint.
    Verified {
        /// Records checked.
        records: u64,
        /// The last one's hash.
        last_hash: String,
        /// What the checkpoints showed.
        anchors: AnchorSummary,
    },
    /// The first record (or checkpoint) that does not fit.
    Broken(ChainError),
}

impl Verdict {
    /// `log verified: N records, last hash H; K signed checkpoints match, …` or
    /// `log broken at record SEQ: REASON`.
    pub fn message(&self) -> String {
        match self {
            Self::Verified {
                records,
                last_hash,
                anchors,
            } => format!(
                "log verified: {records} records, last hash {last_hash}{}",
                anchors.message(*records)
            ),
            Self::Broken(e) => format!("log broken at record {}: {}", e.seq, e.reason),
        }
    }
}

/// Check the chained log `log` of `store` against its chain, every stored checkpoint and the
/// checkpoints `kept_elsewhere` (from alerts, reports); checkpoints must be signed by a key
/// `trust` accepts.
pub async fn verify(
    store: &dyn Store,
    log: &str,
    trust: &Trust,
    kept_elsewhere: Vec<SignedCheckpoint>,
) -> Result<Verdict, StoreError> {
    let mut checkpoints = Vec::new();
    let mut after = None;
    loop {
        let page = store.checkpoints(log, after, PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(*last);
        for (seq, text) in page {
            let checked = SignedCheckpoint::from_text(&text)
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    if c.checkpoint.seq != seq || c.checkpoint.log != log {
                        return Err("it is stored under another log or record".into());
                    }
                    c.verify(trust).map(|_| c).map_err(|e| e.to_string())
                });
            match checked {
                Ok(c) => checkpoints.push(c),
                Err(why) => {
                    return Ok(Verdict::Broken(ChainError {
                        seq,
                        reason: format!(
                            "the stored checkpoint of record {seq} is not one the collector \
                             signed ({why}): the checkpoints were tampered with"
                        ),
                    }));
                }
            }
        }
    }
    for c in kept_elsewhere {
        if c.checkpoint.log != log {
            continue;
        }
        if let Err(e) = c.verify(trust) {
            return Ok(Verdict::Broken(ChainError {
                seq: c.checkpoint.seq,
                reason: format!("{}: {e}", c.describe()),
            }));
        }
        checkpoints.push(c);
    }
    let mut anchors = Anchors::new(checkpoints);
    let verdict = crate::store::verify_store_chain(store, log, &mut anchors).await?;
    Ok(match verdict {
        LogVerdict::Broken(e) => Verdict::Broken(e),
        LogVerdict::Verified { records, last_hash } => match anchors.finish(records) {
            Ok(anchors) => Verdict::Verified {
                records,
                last_hash,
                anchors,
            },
            Err(e) => Verdict::Broken(e),
        },
    })
}

/// The latest signed checkpoint of `log` as JSON (`null` when there is none or it does not
/// parse), as alerts and evidence reports carry it.
pub async fn latest_json(store: &dyn Store, log: &str) -> serde_json::Value {
    match store.latest_checkpoint(log).await {
        Ok(Some(text)) => serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        Ok(None) => serde_json::Value::Null,
        Err(err) => {
            tracing::warn!(error = %err, log, "cannot read the latest checkpoint");
            serde_json::Value::Null
        }
    }
}
