//! The rule evaluation loop: every [`rules::EVAL_EVERY`] and soon after a stored report, the
//! replica holding the rules lease evaluates the breach rules against the policy in force,
//! reloading the policy file when it changes. After reports that may breach a rule were
//! derived (ahead of the queue: `derive::Urgent`), the next evaluation does not wait out the
//! gap that follows a long one, only [`MIN_EVAL_GAP`].

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{PolicyWatch, rules};
use crate::geo::Geo;
use crate::store::Store;

/// How often the policy file is checked for changes.
pub const POLICY_RELOAD_EVERY: Duration = Duration::from_secs(10);
/// Longest the loop waits for a policy file read (it then evaluates with the policy in force).
pub const POLICY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Lease under which one replica evaluates the rules.
const RULES_LEASE: &str = "rules";
/// How long the rules lease lasts without renewal.
const RULES_LEASE_TTL: Duration = Duration::from_secs(10);
/// Shortest time between two evaluations (reports arriving back to back wake the loop only
/// this often).
const MIN_EVAL_GAP: Duration = Duration::from_millis(250);
/// An evaluation that took `t` is followed by at least `t × EVAL_GAP_FACTOR` without one: on a
/// large installation the rules use at most a fifth of the time, whatever the report rate.
const EVAL_GAP_FACTOR: u32 = 4;

/// The rule evaluation loop and what it needs.
#[derive(Debug)]
pub struct Evaluator {
    /// The policy file, reloaded when it changes.
    pub watch: Arc<PolicyWatch>,
    /// Where the facts come from and the breaches go.
    pub store: Arc<dyn Store>,
    /// Places storage servers and node addresses.
    pub geo: Geo,
    /// This replica's name in the rules lease.
    pub holder: String,
    /// Woken by the derivers after a derived batch.
    pub stored: Arc<tokio::sync::Notify>,
    /// Woken by the derivers after reports that may breach a rule were derived first.
    pub urgent: Arc<tokio::sync::Notify>,
    /// Bumped after an evaluation that changed the breach log (wakes the alert workers).
    pub changed: tokio::sync::watch::Sender<u64>,
}

impl Evaluator {
    /// Evaluate the breach rules ([`rules`]) every [`rules::EVAL_EVERY`], and soon after a
    /// report is stored, against the policy current at that moment, reloading the policy file
    /// when it changes (checked every [`POLICY_RELOAD_EVERY`]), until `stop`. Among replicas,
    /// only the holder of the rules lease evaluates.
    pub async fn run(self, stop: CancellationToken) {
        let p = self;
        let mut last_reload = tokio::time::Instant::now();
        let ttl = i64::try_from(RULES_LEASE_TTL.as_millis()).unwrap_or(i64::MAX);
        loop {
            let started = tokio::time::Instant::now();
            if last_reload.elapsed() >= POLICY_RELOAD_EVERY {
                last_reload = tokio::time::Instant::now();
                let reloaded = tokio::select! {
                    r = p.watch.reload_off_thread(POLICY_READ_TIMEOUT) => r,
                    () = stop.cancelled() => return,
                };
                if reloaded == Some(true) {
                    tracing::info!(path = %p.watch.path().display(), "policy reloaded");
                }
            }
            let now = sov_common::clock::now_unix_ms();
            match p.store.take_lease(RULES_LEASE, &p.holder, now, ttl).await {
                Ok(true) => {
                    let policy = p.watch.current();
                    match rules::evaluate(&policy, p.store.as_ref(), &p.geo, now).await {
                        Ok(e) if e.changed() => {
                            p.changed.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        Ok(_) => {}
                        Err(err) => {
                            tracing::warn!(error = %err, "breach rule evaluation failed; will retry");
                        }
                    }
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "cannot take the rules lease; will retry"),
            }
            let gap = MIN_EVAL_GAP.max(started.elapsed().saturating_mul(EVAL_GAP_FACTOR));
            tokio::select! {
                () = tokio::time::sleep_until(started + gap) => {}
                () = p.urgent.notified() => {
                    tokio::select! {
                        () = tokio::time::sleep_until(started + MIN_EVAL_GAP) => {}
                        () = stop.cancelled() => return,
                    }
                }
                () = stop.cancelled() => return,
            }
            tokio::select! {
                () = tokio::time::sleep_until(started + rules::EVAL_EVERY) => {}
                () = p.stored.notified() => {}
                () = stop.cancelled() => return,
            }
        }
    }
}
