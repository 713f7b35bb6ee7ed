//! Appends made durable off the writer (issue 14, tenth round; PERFORMANCE.md §8t).
//!
//! An append transaction commits with `synchronous = NORMAL` (its WAL frames written, not
//! synced) and hands its reports to the [`Syncer`]; the syncer's thread syncs the write-ahead
//! log once for every batch handed to it since its last sync, then answers their callers. The
//! acknowledgement still waits for the fsync that covers its report, so an acknowledged report
//! survives a crash of the machine as with `synchronous = FULL`; what changes is that SQLite's
//! single writer no longer waits for that fsync (about 4 ms on this project's test machine,
//! most of an append transaction's time): it commits the next batch, or a derive slice, while
//! the log is synced, and one fsync covers as many append transactions as committed meanwhile.
//!
//! Why a sync of the file after SQLite's commit is as good as SQLite's own: WAL frames are
//! written in order, and recovery replays the log up to the last commit frame whose checksums
//! hold, so a sync that starts after a transaction's frames were written makes that
//! transaction and every one before it durable. A transaction committed but not yet synced is
//! visible to readers (and may be derived) before it is acknowledged; a crash of the machine
//! then loses it together with anything derived from it (later frames), and its agent, never
//! acknowledged, sends it again. Before SQLite copies the log into the database (a checkpoint)
//! it syncs the log itself (`synchronous = NORMAL` does that), so no checkpoint outruns it.
//!
//! A failed sync is final: after a failed `fsync` the kernel may drop the unwritten pages and
//! mark them clean, so a later sync can succeed without them, and a report sent again would be
//! found committed and acknowledged as a duplicate. From the first failure on, every append is
//! refused (the error says to restart the collector); after a restart SQLite reads the log as
//! it is on disk, and the agents send again whatever was never acknowledged.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, mpsc};

use crate::store::{IngestOutcome, Queued, StoreError, answer};

/// One append transaction's reports and outcomes, committed and waiting for the log's sync.
struct Committed {
    batch: Vec<Queued>,
    outcomes: Vec<Result<IngestOutcome, StoreError>>,
}

/// Syncs the write-ahead log for committed appends and answers them afterwards, on a thread
/// of its own that ends when the store (every clone of it) is dropped.
#[derive(Debug)]
pub(crate) struct Syncer {
    committed: mpsc::Sender<Committed>,
    /// Whether a sync runs (its answers included), and its end signalled.
    syncing: Arc<(Mutex<bool>, Condvar)>,
}

/// Marks the syncer idle when a round ends, a panicking one included (the drainer waits for
/// it: [`Syncer::wait_until_idle`]).
struct Round<'a>(&'a (Mutex<bool>, Condvar));

impl Drop for Round<'_> {
    fn drop(&mut self) {
        *self
            .0
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
        self.0.1.notify_all();
    }
}

impl Syncer {
    /// A syncer of the log at `wal` (the database file's `-wal`).
    pub(super) fn start(wal: PathBuf) -> Result<Self, StoreError> {
        Self::with(move || {
            // Opened for each sync: a file kept open would outlive a log SQLite deleted and
            // made anew (the last connection closing), and then sync nothing.
            std::fs::File::open(&wal)?.sync_data()
        })
    }

    /// A syncer whose sync is `sync` (tests hold it to see what waits for it).
    pub(super) fn with(
        mut sync: impl FnMut() -> std::io::Result<()> + Send + 'static,
    ) -> Result<Self, StoreError> {
        let (committed, rx) = mpsc::channel::<Committed>();
        let syncing = Arc::new((Mutex::new(false), Condvar::new()));
        let state = syncing.clone();
        std::thread::Builder::new()
            .name("sqlite-sync".to_owned())
            .spawn(move || {
                // Once a sync has failed, no later one is trusted: after a failed `fsync`
                // Linux may mark the unwritten pages clean, so a later sync can succeed with
                // the failed one's frames lost, and a report sent again would then be found
                // (committed, in memory) and acknowledged as a duplicate. Every append is
                // refused from then on, until the collector is restarted (SQLite's recovery
                // then reads the log as it is on disk, and the agents send again what it lacks).
                let mut failed: Option<String> = None;
                while let Ok(first) = rx.recv() {
                    *state.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
                    let _round = Round(&state);
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let synced = match &failed {
                        Some(first) => Err(std::io::Error::other(format!(
                            "an earlier sync failed ({first}); restart the collector once the disk is healthy"
                        ))),
                        None => sync(),
                    };
                    if let Err(err) = &synced
                        && failed.is_none()
                    {
                        tracing::error!(error = %err, "sync of the write-ahead log failed; the reports it covered and every later append are refused until the collector is restarted (their agents send them again)");
                        failed = Some(err.to_string());
                    }
                    for c in waiting {
                        match &synced {
                            Ok(()) => answer(c.batch, c.outcomes),
                            Err(err) => {
                                let failed = c
                                    .outcomes
                                    .iter()
                                    .map(|_| {
                                        Err(StoreError::Task(format!(
                                            "sync of the write-ahead log failed: {err}"
                                        )))
                                    })
                                    .collect();
                                answer(c.batch, failed);
                            }
                        }
                    }
                }
            })
            .map_err(|source| StoreError::Open {
                path: "sqlite-sync thread".to_owned(),
                source,
            })?;
        Ok(Self { committed, syncing })
    }

    /// Wait while a sync runs. An append committed during a sync waits for the next one
    /// anyway, so the drainer commits what queued meanwhile in one transaction as that sync
    /// ends, rather than many small ones during it (each commit costs CPU, and CPU is what
    /// the writer then runs short of: PERFORMANCE.md §8t). The writer is not held meanwhile.
    pub(super) fn wait_until_idle(&self) {
        let (lock, ended) = &*self.syncing;
        let mut syncing = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *syncing {
            syncing = ended
                .wait(syncing)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Answer `batch` with `outcomes` once the log is synced past its commit.
    pub(super) fn answer_after_sync(
        &self,
        batch: Vec<Queued>,
        outcomes: Vec<Result<IngestOutcome, StoreError>>,
    ) {
        // Busy from now: the drainer's next commit waits for this sync to end.
        *self
            .syncing
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        if let Err(mpsc::SendError(c)) = self.committed.send(Committed { batch, outcomes }) {
            drop(Round(&self.syncing));
            // The thread is gone (it panicked): nothing can say the log is synced.
            let failed = c
                .outcomes
                .iter()
                .map(|_| Err(StoreError::Task("the log's syncer stopped".to_owned())))
                .collect();
            answer(c.batch, failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued() -> (
        Queued,
        tokio::sync::oneshot::Receiver<Result<IngestOutcome, StoreError>>,
    ) {
        let (done, rx) = tokio::sync::oneshot::channel();
        (
            Queued {
                report: crate::store::suite::report("a", 1, 1),
                done,
            },
            rx,
        )
    }

    #[test]
    fn after_one_failed_sync_every_later_append_is_refused_though_syncs_would_succeed() {
        let calls = Arc::new(Mutex::new(0u32));
        let counted = calls.clone();
        // The first sync fails, every later one would succeed.
        let syncer = Syncer::with(move || {
            let mut n = counted.lock().unwrap();
            *n += 1;
            if *n == 1 {
                Err(std::io::Error::other("EIO"))
            } else {
                Ok(())
            }
        })
        .unwrap();
        for round in 0..3 {
            let (q, rx) = queued();
            syncer.answer_after_sync(vec![q], vec![Ok(IngestOutcome::Stored)]);
            let answer = rx.blocking_recv().unwrap();
            let Err(err) = answer else {
                panic!("round {round}: acknowledged after a failed sync");
            };
            assert!(err.to_string().contains("sync"), "{err}");
            if round > 0 {
                assert!(err.to_string().contains("restart the collector"), "{err}");
            }
        }
        assert_eq!(
            *calls.lock().unwrap(),
            1,
            "no sync trusted after the failure"
        );
    }
}
