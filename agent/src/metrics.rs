//! The agent's own health for Prometheus (`[metrics] listen`): how long building a report took,
//! the spool, reports dropped and acknowledged, the client certificate's expiry, and the
//! process's memory and CPU. Counters and gauges only; nothing the agent observes on the node.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::prometheus::{ProcessStats, family, process_families};
use crate::spool::SpoolStats;

/// Counters the report builder and the sender update (atomics: counting never blocks them).
#[derive(Debug, Default)]
pub struct AgentMetrics {
    cycles: AtomicU64,
    last_cycle_micros: AtomicU64,
    acked: AtomicU64,
    send_failures: AtomicU64,
    renewals: AtomicU64,
    withheld: AtomicU64,
    short_connections: AtomicU64,
    short_unknown: AtomicU64,
}

/// What a scrape reads besides the counters.
#[derive(Debug, Clone, Default)]
pub struct AgentScrape {
    /// The spool now.
    pub spool: SpoolStats,
    /// When the client certificate expires, Unix seconds (`None` when it cannot be read).
    pub cert_not_after_unix: Option<u64>,
    /// This process (`None` without `/proc`).
    pub process: Option<ProcessStats>,
}

impl AgentMetrics {
    /// One report built, taking `micros` of wall time.
    pub fn cycle(&self, micros: u64) {
        self.cycles.fetch_add(1, Ordering::Relaxed);
        self.last_cycle_micros.store(micros, Ordering::Relaxed);
    }

    /// One report acknowledged by a collector.
    pub fn acked(&self) {
        self.acked.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection or delivery failed (the sender reconnects).
    pub fn send_failed(&self) {
        self.send_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A refused report was trimmed (items withheld) to be sent again.
    pub fn withheld(&self) {
        self.withheld.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections that closed before any flow sample saw them, and of those the ones whose
    /// owner stayed unknown (reported with `owner_unknown`).
    pub fn short_connections(&self, all: u64, unknown: u64) {
        self.short_connections.fetch_add(all, Ordering::Relaxed);
        self.short_unknown.fetch_add(unknown, Ordering::Relaxed);
    }

    /// The client certificate was renewed.
    pub fn renewed(&self) {
        self.renewals.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self, scrape: &AgentScrape) -> String {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        let mut one = |name: &str, kind: &str, help: &str, value: String| {
            family(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        };
        one(
            "sov_agent_cycles_total",
            "counter",
            "Reports built (observe, encode, spool).",
            load(&self.cycles).to_string(),
        );
        one(
            "sov_agent_cycle_seconds",
            "gauge",
            "Wall time the last report took to build, seconds.",
            format!("{}", load(&self.last_cycle_micros) as f64 / 1e6),
        );
        one(
            "sov_agent_spool_bytes",
            "gauge",
            "Bytes of the spool on disk (its newest segment keeps acknowledged reports until it is full).",
            scrape.spool.bytes.to_string(),
        );
        one(
            "sov_agent_spool_reports",
            "gauge",
            "Reports in the spool waiting for an ack.",
            scrape.spool.reports.to_string(),
        );
        one(
            "sov_agent_dropped_reports_total",
            "counter",
            "Reports dropped (spool full, corrupt, too large for the spool, or refused by the collector) since the spool was created.",
            scrape.spool.dropped_total.to_string(),
        );
        one(
            "sov_agent_reports_acked_total",
            "counter",
            "Reports acknowledged by a collector since the agent started.",
            load(&self.acked).to_string(),
        );
        one(
            "sov_agent_send_failures_total",
            "counter",
            "Failed connections and deliveries (each followed by a reconnect) since the agent started.",
            load(&self.send_failures).to_string(),
        );
        one(
            "sov_agent_reports_trimmed_total",
            "counter",
            "Times a report the collector refused was sent again with items withheld (declared in the report) since the agent started.",
            load(&self.withheld).to_string(),
        );
        one(
            "sov_agent_short_connections_total",
            "counter",
            "Connections that opened and closed between two flow samples (counted from their destroy events) since the agent started.",
            load(&self.short_connections).to_string(),
        );
        one(
            "sov_agent_short_connections_unknown_owner_total",
            "counter",
            "Of those, connections whose owning process no owner glance saw (reported with owner_unknown) since the agent started.",
            load(&self.short_unknown).to_string(),
        );
        one(
            "sov_agent_certificate_renewals_total",
            "counter",
            "Client certificate renewals since the agent started.",
            load(&self.renewals).to_string(),
        );
        if let Some(t) = scrape.cert_not_after_unix {
            one(
                "sov_agent_certificate_expiry_timestamp_seconds",
                "gauge",
                "When the client certificate expires, Unix seconds.",
                t.to_string(),
            );
        }
        if let Some(p) = scrape.process {
            process_families(&mut out, p);
        }
        cache_families(&mut out);
        out
    }
}

/// The per-process caches' lookups (hit: answered without reading `/proc`) and sizes
/// ([`crate::collect::cache`]).
fn cache_families(out: &mut String) {
    let all = crate::collect::cache::all();
    let mut help = String::from(
        "Lookups of the agent's per-process caches since it started (hit: answered without reading /proc):",
    );
    for c in all {
        let _ = write!(help, " {} = {};", c.name, c.what);
    }
    family(
        out,
        "sov_agent_cache_lookups_total",
        "counter",
        help.trim_end_matches(';'),
    );
    for c in all {
        let (hits, misses, _) = c.read();
        let _ = writeln!(
            out,
            "sov_agent_cache_lookups_total{{cache=\"{}\",result=\"hit\"}} {hits}",
            c.name
        );
        let _ = writeln!(
            out,
            "sov_agent_cache_lookups_total{{cache=\"{}\",result=\"miss\"}} {misses}",
            c.name
        );
    }
    family(
        out,
        "sov_agent_cache_entries",
        "gauge",
        "Entries in each per-process cache now (each bounded by the live processes or sockets).",
    );
    for c in all {
        let _ = writeln!(
            out,
            "sov_agent_cache_entries{{cache=\"{}\"}} {}",
            c.name,
            c.read().2
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_family_has_help_type_and_one_sample() {
        let m = AgentMetrics::default();
        m.cycle(2_500);
        m.acked();
        m.acked();
        let text = m.render(&AgentScrape {
            spool: SpoolStats {
                bytes: 4096,
                reports: 3,
                dropped_total: 7,
                ..Default::default()
            },
            cert_not_after_unix: Some(1_900_000_000),
            process: Some(ProcessStats {
                resident_memory_bytes: 9 << 20,
                cpu_seconds: 1.5,
            }),
        });
        for line in [
            "sov_agent_cycles_total 1",
            "sov_agent_cycle_seconds 0.0025",
            "sov_agent_spool_bytes 4096",
            "sov_agent_spool_reports 3",
            "sov_agent_dropped_reports_total 7",
            "sov_agent_reports_acked_total 2",
            "sov_agent_send_failures_total 0",
            "sov_agent_certificate_expiry_timestamp_seconds 1900000000",
            "process_resident_memory_bytes 9437184",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(helps, types.len(), "{text}");
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap();
            assert!(types.contains(&name), "{sample} has no TYPE line");
        }
    }

    fn lookups(text: &str, cache: &str, result: &str) -> u64 {
        let key =
            format!("sov_agent_cache_lookups_total{{cache=\"{cache}\",result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} missing in\n{text}"))
    }

    #[test]
    fn cache_hit_rates_are_exported_and_follow_the_samples() {
        let m = AgentMetrics::default();
        let render = || m.render(&AgentScrape::default());
        let before = render();
        for cache in crate::collect::cache::all() {
            for result in ["hit", "miss"] {
                lookups(&before, cache.name, result);
            }
            assert!(before.contains(&format!(
                "sov_agent_cache_entries{{cache=\"{}\"}} ",
                cache.name
            )));
        }
        // Three samples of this machine's processes: the first reads every stat (misses),
        // the second too (a first read tells no rate), the third keeps idle ones (hits).
        let mut c = crate::collect::procs::ProcessCollector::new();
        let t0 = std::time::Instant::now();
        for i in 0..3 {
            c.sample(t0 + std::time::Duration::from_secs(i), 3, &[]);
        }
        let after = render();
        let read = c.read_stats();
        assert!(
            lookups(&after, "process_stat", "miss") - lookups(&before, "process_stat", "miss")
                >= read.stat_reads,
            "{read:?}"
        );
        assert!(
            read.stat_kept > 0,
            "idle processes kept at the third sample: {read:?}"
        );
        assert!(
            lookups(&after, "process_stat", "hit") - lookups(&before, "process_stat", "hit")
                >= read.stat_kept
        );
        assert!(lookups(&after, "process_detail", "hit") > 0 || read.detail_kept == 0);
    }
}
