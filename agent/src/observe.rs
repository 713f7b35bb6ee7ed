//! One observation of the node: the single dispatch point over the collectors in
//! [`crate::collect`], shared by the report builder (`run`) and `sov-agent scan`.
//!
//! Order matters: GPUs are sampled first so that their processes are marked interesting for
//! the process sample; the budget is checked last and decides how much optional work the
//! next observation does.

use std::time::{Duration, Instant};

use sov_proto::pb;
use sov_proto::pb::ProcessReason;

use crate::budget::{Budget, BudgetReading, WorkLevel};
use crate::collect::containers::Containers;
use crate::collect::gpu::{GpuCollector, GpuReport};
use crate::collect::host::HostCollector;
use crate::collect::namespaces;
use crate::collect::procs::{ProcessCollector, ProcessSample};
use crate::collect::proctable::ProcTable;
use crate::collect::weights::inventory::WeightsHandle;
use crate::config::{AgentConfig, BudgetConfig, GpuConfig, ProcessesConfig};

/// Top-N processes used while over budget.
pub const REDUCED_TOP_N: usize = 3;

/// Everything one observation saw.
#[derive(Debug, Clone)]
pub struct Observation {
    /// Host sample.
    pub host: pb::HostSample,
    /// GPU state and devices.
    pub gpu: GpuReport,
    /// Selected processes.
    pub processes: ProcessSample,
    /// The agent's own use after this observation.
    pub budget: BudgetReading,
}

/// Owns every collector; keep one per agent (CPU shares are differences between samples).
#[derive(Debug)]
pub struct Observer {
    host: HostCollector,
    gpu: Option<GpuCollector>,
    procs: ProcessCollector,
    budget: Budget,
    top_n: usize,
    weights: Option<WeightsHandle>,
    containers: Containers,
}

impl Observer {
    /// Collectors as the configuration asks (NVML for GPUs when enabled).
    pub fn from_config(cfg: &AgentConfig) -> Self {
        let mut o = Self::from_config_sections(&cfg.processes, &cfg.gpu, &cfg.budget);
        o.containers = Containers::new(
            cfg.processes.containers.clone(),
            std::path::Path::new(crate::collect::procs::DEFAULT_PROC_ROOT),
        )
        .with_table(o.procs.table());
        o
    }

    /// Collectors from the three sections that matter to observation.
    pub fn from_config_sections(
        processes: &ProcessesConfig,
        gpu: &GpuConfig,
        budget: &BudgetConfig,
    ) -> Self {
        let collector = gpu.enabled.then(|| {
            let mut g = GpuCollector::nvml();
            g.set_retry_interval(Duration::from_secs(gpu.retry_secs));
            g
        });
        Self::with_settings(processes, budget, collector)
    }

    /// Collectors with a given GPU collector (tests use a scripted probe; `None` = disabled).
    pub fn with_settings(
        processes: &ProcessesConfig,
        budget: &BudgetConfig,
        gpu: Option<GpuCollector>,
    ) -> Self {
        let mut procs = ProcessCollector::new();
        procs.set_idle_recheck(Duration::from_secs(processes.idle_recheck_secs));
        Self {
            host: HostCollector::new(),
            gpu,
            procs,
            budget: Budget::new(budget.max_rss_bytes, budget.max_cpu_percent),
            top_n: processes.top_n,
            weights: None,
            containers: Containers::default(),
        }
    }

    /// The live processes, shared by every collector of this agent.
    pub fn proc_table(&self) -> ProcTable {
        self.procs.table()
    }

    /// The container directory every collector of this agent shares.
    pub fn containers(&self) -> Containers {
        self.containers.clone()
    }

    /// Use `containers` as the container directory (keep one per agent).
    pub fn set_containers(&mut self, containers: Containers) {
        self.containers = containers;
    }

    /// Mark the users of these weight files as interesting processes, and slow their
    /// fingerprinting down when over budget.
    pub fn set_weights(&mut self, weights: WeightsHandle) {
        self.weights = Some(weights);
    }

    /// Node facts for `NodeInfo` (OS, kernel, boot time, CPUs).
    pub fn node_facts(&self, info: &mut pb::NodeInfo) {
        self.host.node_facts(info);
    }

    /// Observe now. Blocking (reads /proc, calls NVML): run it off the async executor.
    pub fn observe(&mut self, now: Instant) -> Observation {
        self.observe_with(now, &[])
    }

    /// Observe now, also describing the `extra` processes (for example the owners of the
    /// flows this report carries).
    pub fn observe_with(&mut self, now: Instant, extra: &[(u32, ProcessReason)]) -> Observation {
        // The process count from the shared table (no listing of /proc with process events).
        self.host
            .set_process_count(self.procs.table().refresh(Duration::ZERO).len());
        let host = self.host.sample();
        let gpu = match self.gpu.as_mut() {
            Some(g) => g.sample(now),
            None => GpuReport {
                state: pb::GpuState {
                    availability: pb::gpu_state::Availability::Unavailable as i32,
                    reason: "GPU observation disabled in the configuration ([gpu] enabled = false)"
                        .to_owned(),
                    driver_version: String::new(),
                },
                devices: vec![],
            },
        };
        let mut interesting: Vec<(u32, ProcessReason)> = gpu
            .pids()
            .into_iter()
            .map(|pid| (pid, ProcessReason::Gpu))
            .collect();
        if let Some(w) = &self.weights {
            interesting.extend(
                w.user_pids()
                    .into_iter()
                    .map(|pid| (pid, ProcessReason::Weights)),
            );
        }
        interesting.extend_from_slice(extra);
        let top_n = match self.budget.level() {
            WorkLevel::Full => self.top_n,
            WorkLevel::Reduced => self.top_n.min(REDUCED_TOP_N),
        };
        let mut processes = self.procs.sample(now, top_n, &interesting);
        let mut gpu = gpu;
        self.name_containers(&mut processes, &mut gpu);
        let budget = self.budget.check(Instant::now());
        if let Some(w) = &self.weights {
            w.set_reduced(budget.level == WorkLevel::Reduced);
        }
        Observation {
            host,
            gpu,
            processes,
            budget,
        }
    }
}

impl Observer {
    /// Container, pod and namespaces of every reported process and GPU process.
    fn name_containers(&self, processes: &mut ProcessSample, gpu: &mut GpuReport) {
        let mut pids: Vec<u32> = processes.processes.iter().map(|p| p.pid).collect();
        pids.extend(gpu.pids());
        pids.sort_unstable();
        pids.dedup();
        let refs = self.containers.of_pids(&pids);
        let proc_root = std::path::Path::new(crate::collect::procs::DEFAULT_PROC_ROOT);
        for p in &mut processes.processes {
            p.container = refs.get(&p.pid).cloned().map(Box::new);
            // Read with the process's other details (and kept with them); only a process
            // whose namespaces could not be read then is asked again.
            if p.netns_inode == 0 {
                p.netns_inode = namespaces::of_pid(proc_root, p.pid, namespaces::NET).unwrap_or(0);
            }
            if p.mntns_inode == 0 {
                p.mntns_inode = namespaces::of_pid(proc_root, p.pid, namespaces::MNT).unwrap_or(0);
            }
        }
        for d in &mut gpu.devices {
            for p in &mut d.processes {
                p.container = refs.get(&p.pid).cloned();
            }
        }
    }
}

impl Observation {
    /// The agent's health facts for the report.
    pub fn agent_stats(&self) -> pb::AgentStats {
        pb::AgentStats {
            rss_bytes: self.budget.rss_bytes,
            cpu_percent: self.budget.cpu_percent,
            over_budget: !self.budget.over.is_empty(),
            budget_reason: self.budget.over.join(", "),
            ..Default::default()
        }
    }
}
