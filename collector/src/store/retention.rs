//! Bounded retention: what [`super::Store::prune`] keeps, what it removed, and the loop that
//! prunes every [`PRUNE_EVERY`].

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Store;

/// How often old time series rows are pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// What [`Store::prune`] keeps: raw rows for a while, minute aggregates longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Raw time series (host and GPU samples, GPU usage), raw flows and report bodies observed
    /// before this instant go, after host and GPU samples and usage were folded into minute
    /// aggregates (a minute folded in two passes is merged: counts add, averages are
    /// weighted, maxima kept).
    pub raw_before_unix_ms: i64,
    /// Host, GPU and GPU-usage minute aggregates and day rows of flows and GPU usage before
    /// this instant go, and every flow minute and hour row before it whatever the two cut-offs
    /// below say.
    pub aggregates_before_unix_ms: i64,
    /// Flow minutes and per-minute container identity before this instant go, once rolled up
    /// into hour rows (never past where the hourly rollup has come to).
    pub minutes_before_unix_ms: i64,
    /// Hour rows before this instant go, once rolled up into day rows (never past where the
    /// daily rollup has come to).
    pub hours_before_unix_ms: i64,
}

impl Retention {
    /// Raw rows and aggregates alike before `before_unix_ms`.
    pub fn all_before(before_unix_ms: i64) -> Self {
        Self {
            raw_before_unix_ms: before_unix_ms,
            aggregates_before_unix_ms: before_unix_ms,
            minutes_before_unix_ms: before_unix_ms,
            hours_before_unix_ms: before_unix_ms,
        }
    }

    /// Where flow minutes and hour rows are cut given how far the rollups came: at their own
    /// cut-off if what goes was rolled up, else where the rollup stopped; never after the
    /// aggregates' cut-off.
    pub fn cuts(&self, up_to: super::rollup::UpTo) -> (i64, i64) {
        let a = self.aggregates_before_unix_ms;
        (
            a.max(self.minutes_before_unix_ms.min(up_to.hours)),
            a.max(self.hours_before_unix_ms.min(up_to.days)),
        )
    }
}

/// How long each kind of row is kept (the configuration's `*_retention_days`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// Raw rows and report bodies (`retention_days`).
    pub raw: Duration,
    /// Flow minutes (`minute_retention_days`).
    pub minutes: Duration,
    /// Hour rows (`hour_retention_days`).
    pub hours: Duration,
    /// Minute series and day rows (`aggregate_retention_days`).
    pub aggregates: Duration,
}

/// Rows removed by [`Store::prune`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStats {
    /// True when another replica was pruning at that moment: this call did nothing.
    pub skipped: bool,
    /// Minute aggregate rows written or updated from raw samples about to go.
    pub downsampled: u64,
    /// Host, GPU and GPU usage minute aggregates deleted.
    pub aggregates: u64,
    /// Host samples deleted.
    pub host_samples: u64,
    /// GPU samples deleted.
    pub gpu_samples: u64,
    /// GPU usage rows deleted.
    pub gpu_usage: u64,
    /// Report bodies emptied (their keys stay for idempotency and completeness).
    pub report_bodies: u64,
    /// Per-minute flow aggregates and raw foreign flows deleted.
    pub flows: u64,
}

/// Prune now and then every [`PRUNE_EVERY`], each kind of row older than `keep` says (see
/// [`Retention`]).
pub async fn prune_loop(store: Arc<dyn Store>, keep: Keep, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    let ago = |d: Duration| {
        sov_common::clock::now_unix_ms()
            .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let retention = Retention {
            raw_before_unix_ms: ago(keep.raw),
            aggregates_before_unix_ms: ago(keep.aggregates),
            minutes_before_unix_ms: ago(keep.minutes),
            hours_before_unix_ms: ago(keep.hours),
        };
        match store.prune(retention).await {
            Ok(s) if s.skipped => {
                tracing::debug!("retention skipped: another replica is pruning");
            }
            Ok(s) => tracing::info!(
                host_samples = s.host_samples,
                gpu_samples = s.gpu_samples,
                gpu_usage = s.gpu_usage,
                report_bodies = s.report_bodies,
                flows = s.flows,
                downsampled = s.downsampled,
                aggregates = s.aggregates,
                "retention pruned old rows"
            ),
            Err(err) => tracing::warn!(error = %err, "retention prune failed; will retry"),
        }
    }
}
