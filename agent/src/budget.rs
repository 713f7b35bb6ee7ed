//! The agent's self-imposed resource budget, in the spirit of osquery's watchdog: the agent
//! measures its own resident memory and CPU share every cycle; when either is over its limit
//! it logs it, reports it (`AgentStats.over_budget`), and sheds optional work (fewer and less
//! detailed processes) until it is comfortably back under (80 % of both limits).

use std::time::Instant;

/// Default ceiling of the agent's resident memory.
pub const DEFAULT_MAX_RSS_BYTES: u64 = 128 * 1024 * 1024;
/// Default ceiling of the agent's CPU share over one interval, percent of one CPU.
pub const DEFAULT_MAX_CPU_PERCENT: f32 = 5.0;
/// Below this fraction of both limits, shedding stops.
const RECOVER_FRACTION: f64 = 0.8;
/// Linux USER_HZ: the unit of utime/stime in /proc/<pid>/stat on every mainstream architecture.
const TICKS_PER_SEC: f64 = 100.0;
/// Page size used to turn /proc/self/statm pages into bytes.
const PAGE_BYTES: u64 = 4096;

/// How much optional work the agent does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkLevel {
    /// Everything configured.
    Full,
    /// Over budget: optional work shed.
    Reduced,
}

/// One reading of the agent's own use.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetReading {
    /// Resident memory of the agent process.
    pub rss_bytes: u64,
    /// CPU share of the agent over the interval since the previous reading, percent of one CPU.
    pub cpu_percent: f32,
    /// Work level to use until the next reading.
    pub level: WorkLevel,
    /// Which limits are exceeded, e.g. "rss 150 MiB > 128 MiB"; empty when within budget.
    pub over: Vec<String>,
}

/// Tracks the agent's use against its limits.
#[derive(Debug)]
pub struct Budget {
    max_rss_bytes: u64,
    max_cpu_percent: f32,
    prev: Option<(Instant, u64)>,
    level: WorkLevel,
}

/// (utime + stime ticks, rss bytes) of this process.
fn self_usage() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15 → indices 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let rss_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some((utime + stime, rss_pages * PAGE_BYTES))
}

impl Budget {
    /// A budget with these limits.
    pub fn new(max_rss_bytes: u64, max_cpu_percent: f32) -> Self {
        Self {
            max_rss_bytes,
            max_cpu_percent,
            prev: None,
            level: WorkLevel::Full,
        }
    }

    /// Current work level.
    pub fn level(&self) -> WorkLevel {
        self.level
    }

    /// Measure now and decide the work level.
    pub fn check(&mut self, now: Instant) -> BudgetReading {
        let Some((ticks, rss)) = self_usage() else {
            return BudgetReading {
                rss_bytes: 0,
                cpu_percent: 0.0,
                level: self.level,
                over: vec![],
            };
        };
        let cpu = match self.prev {
            Some((t0, ticks0)) => {
                let secs = now.duration_since(t0).as_secs_f64();
                if secs > 0.0 {
                    (ticks.saturating_sub(ticks0) as f64 / TICKS_PER_SEC) / secs * 100.0
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.prev = Some((now, ticks));
        self.decide(rss, cpu)
    }

    /// The decision, separated from measuring so that it can be tested with any numbers.
    pub fn decide(&mut self, rss_bytes: u64, cpu_percent: f64) -> BudgetReading {
        let mut over = Vec::new();
        if rss_bytes > self.max_rss_bytes {
            over.push(format!(
                "rss {} MiB > {} MiB",
                rss_bytes >> 20,
                self.max_rss_bytes >> 20
            ));
        }
        if cpu_percent > f64::from(self.max_cpu_percent) {
            over.push(format!(
                "cpu {cpu_percent:.1}% > {:.1}%",
                self.max_cpu_percent
            ));
        }
        let comfortable = (rss_bytes as f64) < self.max_rss_bytes as f64 * RECOVER_FRACTION
            && cpu_percent < f64::from(self.max_cpu_percent) * RECOVER_FRACTION;
        let before = self.level;
        self.level = if !over.is_empty() {
            WorkLevel::Reduced
        } else if comfortable {
            WorkLevel::Full
        } else {
            before
        };
        if self.level != before {
            match self.level {
                WorkLevel::Reduced => {
                    tracing::warn!(over = %over.join(", "), "agent over its resource budget; shedding optional work")
                }
                WorkLevel::Full => tracing::info!("agent back within its resource budget"),
            }
        }
        #[allow(clippy::cast_possible_truncation)]
        BudgetReading {
            rss_bytes,
            cpu_percent: cpu_percent as f32,
            level: self.level,
            over,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn going_over_either_limit_sheds_work_and_recovery_needs_a_margin() {
        let mut b = Budget::new(100 << 20, 10.0);
        assert_eq!(b.decide(50 << 20, 2.0).level, WorkLevel::Full);
        let r = b.decide(150 << 20, 2.0);
        assert_eq!(r.level, WorkLevel::Reduced);
        assert_eq!(r.over, vec!["rss 150 MiB > 100 MiB".to_owned()]);
        // Just under the limit is not yet comfortable: stay reduced (no flapping).
        assert_eq!(b.decide(95 << 20, 2.0).level, WorkLevel::Reduced);
        assert_eq!(b.decide(50 << 20, 2.0).level, WorkLevel::Full);
        let r = b.decide(50 << 20, 25.0);
        assert_eq!(r.level, WorkLevel::Reduced);
        assert!(r.over[0].starts_with("cpu 25.0%"), "{:?}", r.over);
    }

    #[test]
    fn the_agent_measures_its_own_memory_and_cpu() {
        let mut b = Budget::new(u64::MAX, 1000.0);
        let t0 = Instant::now();
        let first = b.check(t0);
        assert!(first.rss_bytes > 1 << 20, "{first:?}");
        // Spin one thread for a bounded 300 ms.
        let end = Instant::now() + Duration::from_millis(300);
        let mut x = 0u64;
        while Instant::now() < end {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        let r = b.check(Instant::now());
        assert!(r.cpu_percent > 20.0, "{r:?}");
        assert_eq!(r.level, WorkLevel::Full);
        let mut tight = Budget::new(1, 1000.0);
        assert_eq!(tight.check(Instant::now()).level, WorkLevel::Reduced);
    }
}
