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

use std::path::PathBuf;
use std::sync::mpsc;

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
        std::thread::Builder::new()
            .name("sqlite-sync".to_owned())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let synced = sync();
                    if let Err(err) = &synced {
                        tracing::error!(error = %err, "sync of the write-ahead log failed; the reports it covered are refused (their agents send them again)");
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
        Ok(Self { committed })
    }

    /// Answer `batch` with `outcomes` once the log is synced past its commit.
    pub(super) fn answer_after_sync(
        &self,
        batch: Vec<Queued>,
        outcomes: Vec<Result<IngestOutcome, StoreError>>,
    ) {
        if let Err(mpsc::SendError(c)) = self.committed.send(Committed { batch, outcomes }) {
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
