//! The deriver's own threads, at a lower scheduling priority than the acknowledgements
//! (issue 14: acknowledge after one durable append, derive in batches afterwards).
//!
//! Derivation's CPU work (decoding the committed reports, geolocating their flows, judging
//! the verdicts, merging the flows by aggregate key) used to run on tokio's blocking pool, the
//! same threads that hold the appends' group commits, beside the runtime's workers that do the
//! agents' TLS and protobuf: on a machine with few cores it took their CPU, and every
//! acknowledgement waited a little longer. Here it runs on threads of its own whose niceness is
//! raised once, as each starts (`setpriority(PRIO_PROCESS, tid, nice)`: on Linux the niceness is
//! per thread), so that the kernel gives the acknowledgement path the CPU first and derivation
//! what is left. An unprivileged process cannot lower a niceness again, which is why these are
//! dedicated threads and not the blocking pool's, and why the work that holds SQLite's single
//! writer (the derive transaction, which every append would wait behind) is not done here.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, mpsc};

use crate::store::StoreError;

/// A unit of work sent to the threads.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads at one niceness, fed by a queue.
#[derive(Debug)]
pub struct DeriveThreads {
    jobs: Mutex<mpsc::Sender<Job>>,
    threads: usize,
    /// The niceness the threads run at (the process's when it could not be raised).
    nice: Option<i32>,
}

impl DeriveThreads {
    /// `threads` threads (at least one) whose niceness is the process's raised by `increment`
    /// (0: as the process's; at most 19; a change the kernel refuses leaves a thread as it was,
    /// logged). The threads end when this is dropped and their queue is empty.
    pub fn start(threads: usize, increment: i32) -> Result<Arc<Self>, StoreError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let (told, results) = mpsc::channel();
        let threads = threads.max(1);
        for i in 0..threads {
            let rx = rx.clone();
            let told = told.clone();
            std::thread::Builder::new()
                .name(format!("sov-derive-{i}"))
                .spawn(move || {
                    let _ = told.send(lower_own_priority(increment));
                    drop(told);
                    loop {
                        let job = {
                            let queue =
                                rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            queue.recv()
                        };
                        match job {
                            // A panicking job loses its answer (the caller sees an error); the
                            // thread goes on with the next.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| StoreError::Task(format!("cannot start a derive thread: {e}")))?;
        }
        drop(told);
        let mut nice = None;
        for r in results.iter().take(threads) {
            match r {
                Ok(n) => {
                    nice.get_or_insert(n);
                }
                Err(err) => {
                    tracing::warn!(increment, error = %err,
                        "a derive thread's niceness was not raised; derivation competes with acknowledgements for the CPU");
                }
            }
        }
        tracing::debug!(threads, ?nice, "derive threads started");
        Ok(Arc::new(Self {
            jobs: Mutex::new(tx),
            threads,
            nice,
        }))
    }

    /// How many threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The niceness the threads run at (`None` when it could not be read or set).
    pub fn nice(&self) -> Option<i32> {
        self.nice
    }

    /// Run `f` on one of the threads and return what it returns.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(job)
            .map_err(|_| StoreError::Task("the derive threads are gone".to_owned()))?;
        rx.await
            .map_err(|_| StoreError::Task("a derive job panicked".to_owned()))
    }
}

/// Highest niceness Linux knows (the lowest priority of `SCHED_OTHER`).
const MAX_NICE: i32 = 19;

/// Raise the calling thread's niceness by `increment` (as `nice -n`: relative to the niceness
/// the process was started with, at most 19; Linux: per thread); the niceness it ends at.
fn lower_own_priority(increment: i32) -> std::io::Result<i32> {
    let tid = rustix::thread::gettid();
    let current = rustix::process::getpriority_process(Some(tid)).map_err(std::io::Error::from)?;
    let target = current.saturating_add(increment).min(MAX_NICE);
    if target != current {
        rustix::process::setpriority_process(Some(tid), target).map_err(std::io::Error::from)?;
    }
    Ok(target)
}

/// The calling thread's niceness (Linux: per thread).
#[cfg(test)]
fn own_priority() -> i32 {
    rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_threads_at_the_niceness_asked_and_the_caller_keeps_its_own() {
        let before = own_priority();
        let pool = DeriveThreads::start(2, 7).unwrap();
        // Raised from the process's (tests may themselves run under `nice`), at most 19.
        let expected = (before + 7).min(MAX_NICE);
        assert_eq!(pool.nice(), Some(expected));
        let seen = pool.run(own_priority).await.unwrap();
        assert_eq!(seen, expected, "the job ran at the pool's niceness");
        assert_eq!(own_priority(), before, "the caller's thread is untouched");
        let name = pool
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert!(name.is_some_and(|n| n.starts_with("sov-derive-")));
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone_and_the_threads_go_on() {
        let pool = DeriveThreads::start(1, 0).unwrap();
        let err = pool.run(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert_eq!(pool.run(|| 41 + 1).await.unwrap(), 42);
    }
}
