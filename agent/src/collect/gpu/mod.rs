//! GPUs and the processes on them.
//!
//! Parts:
//! - [`GpuProbe`]: the one trait a GPU source implements: a snapshot of every device as plain
//!   [`DeviceReading`]s, or a [`ProbeError`] saying why none could be taken;
//! - [`nvml`]: [`NvmlProbe`], the real source, through nvml-wrapper (NVML is loaded at run time;
//!   a node without the NVIDIA library or driver keeps working and says why);
//! - [`fake`]: [`ScriptedProbe`], a scripted test double used by this module's tests, the agent's
//!   tests and the end-to-end tests;
//! - [`GpuCollector`]: owns a probe, converts readings into `sovereign.v1` messages, reports a
//!   clear [`pb::GpuState`] when observation is impossible, retries a failed probe at most every
//!   `retry_interval`, and accounts GPU-seconds per process.
//!
//! Time is always passed in (`now: Instant`), never read here, so tests drive it without sleeping.
//!
//! # GPU-seconds
//!
//! Each successful sample charges every process it sees, once per (device, MIG instance, pid),
//! `elapsed × share` where `elapsed` is the time since the previous successful sample and `share`
//! is the driver's SM utilisation for the process divided by 100, or 1 when the driver gives no
//! share but the process is resident on the device (it holds the device, so it is charged for it).
//! Consequences, chosen on purpose:
//! - a process that appears between two samples is charged the whole interval times its share
//!   (the driver cannot say when it started; the error is at most one interval);
//! - the first sample after start, and the first after an outage (probe unavailable), charges
//!   nothing: time that was not observed is not attributed to anyone;
//! - on a MIG instance the driver gives no per-process share, so a resident process is charged
//!   one second per second: the figure is instance-seconds, not whole-GPU-seconds.
//!
//! The running total per pid ([`GpuCollector::total_gpu_seconds`]) only holds pids seen in the
//! latest sample: a pid absent from a sample (it left, or its device stopped answering) is dropped,
//! so memory stays bounded by the processes currently on GPUs.

pub mod fake;
pub mod nvml;

pub use fake::ScriptedProbe;
pub use nvml::NvmlProbe;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use sov_proto::pb;
use sov_proto::pb::gpu_state::Availability;

/// How long after a failed probe (or failed initialisation) the collector tries again.
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(60);

/// `GpuProcess.kind` for a compute (CUDA, OpenCL…) context.
pub const KIND_COMPUTE: &str = "compute";
/// `GpuProcess.kind` for a graphics context.
pub const KIND_GRAPHICS: &str = "graphics";

/// Why a probe could not be created or could not take a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// GPU observation is impossible: library missing, driver not loaded, no permission.
    /// The text is the whole reason, e.g. "NVML unavailable: libnvidia-ml.so.1: cannot open…".
    #[error("{0}")]
    Unavailable(String),
    /// The GPU library answered but there is no device.
    #[error("no gpu device")]
    NoDevices,
    /// The driver failed the request as a whole (as opposed to one device failing).
    #[error("gpu driver error: {0}")]
    Driver(String),
}

/// A source of GPU readings. One instance lives as long as the library session it holds
/// (NVML is initialised once, when the probe is created).
pub trait GpuProbe: Send {
    /// Short name for logs, e.g. "nvml".
    fn name(&self) -> &'static str;
    /// Every device now. A device that stopped answering is still listed, with `error` set.
    fn snapshot(&mut self) -> Result<Vec<DeviceReading>, ProbeError>;
    /// Driver version when known.
    fn driver_version(&self) -> Option<String>;
}

/// Whether a GPU process holds a compute or a graphics context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ProcessKind {
    /// CUDA / OpenCL / compute context.
    #[default]
    Compute,
    /// Graphics context.
    Graphics,
}

impl ProcessKind {
    /// The wire spelling: [`KIND_COMPUTE`] or [`KIND_GRAPHICS`].
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessKind::Compute => KIND_COMPUTE,
            ProcessKind::Graphics => KIND_GRAPHICS,
        }
    }
}

/// One process on one device, as the probe read it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessReading {
    pub pid: u32,
    /// GPU memory the process holds, in bytes (0 when the driver does not say).
    pub used_memory_bytes: u64,
    /// SM share over the driver's recent samples, 0-100; `None` when the driver gave none.
    pub sm_percent: Option<u32>,
    pub kind: ProcessKind,
    /// Identifier of the MIG instance the process runs on; empty without MIG.
    pub mig_uuid: String,
}

/// One MIG instance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigReading {
    pub uuid: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    /// 0 when unknown.
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
}

/// One device, as the probe read it. Fields the device does not support are zero / empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceReading {
    /// NVML device index.
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// e.g. "00000000:17:00.0".
    pub pci_bus_id: String,
    pub utilization_gpu_percent: u32,
    pub utilization_memory_percent: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub power_draw_milliwatts: u32,
    pub power_limit_milliwatts: u32,
    pub temperature_celsius: u32,
    pub mig_enabled: bool,
    pub mig_instances: Vec<MigReading>,
    pub processes: Vec<ProcessReading>,
    /// Set when the device stopped answering (fallen off the bus, driver error); the fields read
    /// before the failure are kept, the others are zero.
    pub error: Option<String>,
}

/// Makes a probe; called again (at most every retry interval) after it failed.
pub type ProbeFactory = Box<dyn FnMut() -> Result<Box<dyn GpuProbe>, ProbeError> + Send>;

/// What one [`GpuCollector::sample`] saw.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuReport {
    /// Available / Unavailable (with the reason) / NoDevices, and the driver version.
    pub state: pb::GpuState,
    /// One per device; empty unless `state` is Available.
    pub devices: Vec<pb::GpuSample>,
}

impl GpuReport {
    /// Every pid on any GPU in this report, sorted, without duplicates.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .devices
            .iter()
            .flat_map(|d| d.processes.iter().map(|p| p.pid))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The availability as the generated enum (unknown numbers read as `Unspecified`).
    pub fn availability(&self) -> Availability {
        Availability::try_from(self.state.availability).unwrap_or(Availability::Unspecified)
    }
}

/// Owns a [`GpuProbe`]; keep one per agent and call [`GpuCollector::sample`] once per interval.
///
/// `sample` makes blocking library calls (NVML): call it from a blocking context
/// (`tokio::task::spawn_blocking` or a dedicated thread).
pub struct GpuCollector {
    factory: Option<ProbeFactory>,
    probe: Option<Box<dyn GpuProbe>>,
    retry_interval: Duration,
    /// Set after a failure: no probe call before this instant; the report repeats `failure`.
    retry_at: Option<Instant>,
    failure: Option<ProbeError>,
    /// Time of the previous successful snapshot (the start of the interval being charged).
    previous_ok: Option<Instant>,
    /// Running GPU-seconds per pid, for pids seen in the latest sample.
    totals: HashMap<u32, f64>,
    /// Identity of each device index from its last good reading, to label a device that failed.
    identities: HashMap<u32, (String, String, String)>,
    /// Last state logged, so transitions are logged once.
    logged: Option<(Availability, String)>,
}

impl fmt::Debug for GpuCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuCollector")
            .field("probe", &self.probe.as_ref().map(|p| p.name()))
            .field("has_factory", &self.factory.is_some())
            .field("retry_interval", &self.retry_interval)
            .field("retry_at", &self.retry_at)
            .field("failure", &self.failure)
            .field("tracked_pids", &self.totals.len())
            .finish()
    }
}

impl GpuCollector {
    /// A collector over NVML. Never fails: NVML is initialised at the first sample, and when it
    /// cannot be (no library, no driver) the report says `Unavailable` with the reason and
    /// initialisation is retried every [`DEFAULT_RETRY_INTERVAL`].
    pub fn nvml() -> Self {
        Self::with_factory(
            Box::new(|| NvmlProbe::new().map(|p| Box::new(p) as Box<dyn GpuProbe>)),
            DEFAULT_RETRY_INTERVAL,
        )
    }

    /// A collector over an existing probe. The probe is never recreated: after a failed
    /// snapshot the same probe is asked again after [`DEFAULT_RETRY_INTERVAL`].
    pub fn with_probe(probe: Box<dyn GpuProbe>) -> Self {
        let mut c = Self::new(None, DEFAULT_RETRY_INTERVAL);
        c.probe = Some(probe);
        c
    }

    /// A collector that makes its probe with `factory`, at the first sample and again after a
    /// failure (dropping the failed probe first), at most once every `retry_interval`.
    pub fn with_factory(factory: ProbeFactory, retry_interval: Duration) -> Self {
        Self::new(Some(factory), retry_interval)
    }

    fn new(factory: Option<ProbeFactory>, retry_interval: Duration) -> Self {
        Self {
            factory,
            probe: None,
            retry_interval,
            retry_at: None,
            failure: None,
            previous_ok: None,
            totals: HashMap::new(),
            identities: HashMap::new(),
            logged: None,
        }
    }

    /// Changes the retry interval (the default is [`DEFAULT_RETRY_INTERVAL`]).
    pub fn set_retry_interval(&mut self, retry_interval: Duration) {
        self.retry_interval = retry_interval;
    }

    /// GPU-seconds accumulated by `pid` over all devices since it was first seen, while it stayed
    /// visible; `None` for a pid not in the latest sample.
    pub fn total_gpu_seconds(&self, pid: u32) -> Option<f64> {
        self.totals.get(&pid).copied()
    }

    /// One sample at `now`. Never panics; a probe that cannot answer yields a report whose state
    /// says why.
    pub fn sample(&mut self, now: Instant) -> GpuReport {
        if let (Some(at), Some(failure)) = (self.retry_at, self.failure.as_ref())
            && now < at
        {
            let state = self.failure_state(failure);
            return GpuReport {
                state,
                devices: Vec::new(),
            };
        }
        self.retry_at = None;

        if self.probe.is_none() {
            let made = match self.factory.as_mut() {
                Some(factory) => factory(),
                None => Err(ProbeError::Unavailable("no gpu probe".to_owned())),
            };
            match made {
                Ok(probe) => {
                    tracing::debug!(probe = probe.name(), "gpu probe ready");
                    self.probe = Some(probe);
                }
                Err(err) => return self.fail(now, err),
            }
        }
        let Some(probe) = self.probe.as_mut() else {
            return self.fail(now, ProbeError::Unavailable("no gpu probe".to_owned()));
        };

        let readings = match probe.snapshot() {
            Ok(readings) if readings.is_empty() => Err(ProbeError::NoDevices),
            other => other,
        };
        let driver_version = probe.driver_version().unwrap_or_default();
        match readings {
            Ok(readings) => self.observed(now, readings, driver_version),
            Err(ProbeError::NoDevices) => {
                // The library answers; devices may appear (hot plug, VM attach): ask again next
                // sample, no back-off.
                self.failure = None;
                self.previous_ok = Some(now);
                self.totals.clear();
                let state = pb::GpuState {
                    availability: Availability::NoDevices as i32,
                    reason: ProbeError::NoDevices.to_string(),
                    driver_version,
                };
                self.log_state(&state);
                GpuReport {
                    state,
                    devices: Vec::new(),
                }
            }
            Err(err) => self.fail(now, err),
        }
    }

    /// A failed probe creation or snapshot: report it, forget the interval start and the
    /// totals, and back off.
    fn fail(&mut self, now: Instant, err: ProbeError) -> GpuReport {
        let state = self.failure_state(&err);
        if self.factory.is_some() {
            // Recreate the probe (re-initialise the library) on the next attempt.
            self.probe = None;
        }
        self.retry_at = now.checked_add(self.retry_interval);
        self.previous_ok = None;
        self.totals.clear();
        self.failure = Some(err);
        self.log_state(&state);
        GpuReport {
            state,
            devices: Vec::new(),
        }
    }

    fn failure_state(&self, err: &ProbeError) -> pb::GpuState {
        let availability = match err {
            ProbeError::NoDevices => Availability::NoDevices,
            ProbeError::Unavailable(_) | ProbeError::Driver(_) => Availability::Unavailable,
        };
        pb::GpuState {
            availability: availability as i32,
            reason: err.to_string(),
            driver_version: self
                .probe
                .as_ref()
                .and_then(|p| p.driver_version())
                .unwrap_or_default(),
        }
    }

    fn observed(
        &mut self,
        now: Instant,
        readings: Vec<DeviceReading>,
        driver_version: String,
    ) -> GpuReport {
        let elapsed = self
            .previous_ok
            .map(|prev| now.saturating_duration_since(prev).as_secs_f64())
            .unwrap_or(0.0);
        self.previous_ok = Some(now);
        self.failure = None;

        let mut charged: HashSet<(u32, String, u32)> = HashSet::new();
        let mut totals: HashMap<u32, f64> = HashMap::new();
        let mut devices = Vec::with_capacity(readings.len());
        for mut reading in readings {
            if reading.error.is_none() {
                self.identities.insert(
                    reading.index,
                    (
                        reading.uuid.clone(),
                        reading.name.clone(),
                        reading.pci_bus_id.clone(),
                    ),
                );
            } else if let Some((uuid, name, bus)) = self.identities.get(&reading.index) {
                fill_if_empty(&mut reading.uuid, uuid);
                fill_if_empty(&mut reading.name, name);
                fill_if_empty(&mut reading.pci_bus_id, bus);
            }
            let mut sample = to_sample(&reading);
            for (proc_reading, proc_sample) in reading.processes.iter().zip(&mut sample.processes) {
                let key = (
                    reading.index,
                    proc_reading.mig_uuid.clone(),
                    proc_reading.pid,
                );
                let secs = if charged.insert(key) {
                    elapsed * share(proc_reading.sm_percent)
                } else {
                    // Listed twice on one device (compute and graphics): charge once.
                    0.0
                };
                proc_sample.gpu_seconds = secs;
                let total = totals
                    .entry(proc_reading.pid)
                    .or_insert_with(|| self.totals.get(&proc_reading.pid).copied().unwrap_or(0.0));
                *total += secs;
            }
            devices.push(sample);
        }
        self.totals = totals;

        let state = pb::GpuState {
            availability: Availability::Available as i32,
            reason: String::new(),
            driver_version,
        };
        self.log_state(&state);
        GpuReport { state, devices }
    }

    fn log_state(&mut self, state: &pb::GpuState) {
        let availability =
            Availability::try_from(state.availability).unwrap_or(Availability::Unspecified);
        let key = (availability, state.reason.clone());
        if self.logged.as_ref() == Some(&key) {
            return;
        }
        match availability {
            Availability::Available => tracing::info!(
                driver_version = %state.driver_version,
                "gpu observation available"
            ),
            Availability::NoDevices => tracing::info!("gpu library present, no gpu device"),
            Availability::Unavailable | Availability::Unspecified => tracing::warn!(
                reason = %state.reason,
                retry_secs = self.retry_interval.as_secs(),
                "gpu observation unavailable"
            ),
        }
        self.logged = Some(key);
    }
}

/// The identifier of a MIG instance in the legacy form `MIG-<parent GPU uuid>/<gi>/<ci>`
/// (accepted by `CUDA_VISIBLE_DEVICES`). nvml-wrapper 0.11 has no safe call for MIG device
/// handles, so the per-instance `MIG-<uuid>` of newer drivers cannot be read; this form names
/// the same instance and is stable while the instance exists.
pub fn mig_id(parent_uuid: &str, gpu_instance_id: u32, compute_instance_id: u32) -> String {
    format!("MIG-{parent_uuid}/{gpu_instance_id}/{compute_instance_id}")
}

fn fill_if_empty(field: &mut String, known: &str) {
    if field.is_empty() {
        known.clone_into(field);
    }
}

/// The part of the device a process is charged for: its SM share, or all of it when resident
/// without a share.
fn share(sm_percent: Option<u32>) -> f64 {
    match sm_percent {
        Some(p) => f64::from(p.min(100)) / 100.0,
        None => 1.0,
    }
}

fn to_sample(r: &DeviceReading) -> pb::GpuSample {
    pb::GpuSample {
        index: r.index,
        uuid: r.uuid.clone(),
        name: r.name.clone(),
        utilization_gpu_percent: r.utilization_gpu_percent,
        utilization_memory_percent: r.utilization_memory_percent,
        memory_used_bytes: r.memory_used_bytes,
        memory_total_bytes: r.memory_total_bytes,
        power_draw_milliwatts: r.power_draw_milliwatts,
        power_limit_milliwatts: r.power_limit_milliwatts,
        temperature_celsius: r.temperature_celsius,
        mig_enabled: r.mig_enabled,
        mig_instances: r
            .mig_instances
            .iter()
            .map(|m| pb::MigInstance {
                uuid: m.uuid.clone(),
                gpu_instance_id: m.gpu_instance_id,
                compute_instance_id: m.compute_instance_id,
                memory_total_bytes: m.memory_total_bytes,
                memory_used_bytes: m.memory_used_bytes,
            })
            .collect(),
        processes: r
            .processes
            .iter()
            .map(|p| pb::GpuProcess {
                pid: p.pid,
                used_memory_bytes: p.used_memory_bytes,
                sm_percent: p.sm_percent,
                gpu_seconds: 0.0,
                kind: p.kind.as_str().to_owned(),
                mig_uuid: p.mig_uuid.clone(),
                container: None,
            })
            .collect(),
        pci_bus_id: r.pci_bus_id.clone(),
        error: r.error.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{device, mig, process};
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const GIB: u64 = 1 << 30;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn collector(probe: ScriptedProbe) -> GpuCollector {
        GpuCollector::with_probe(Box::new(probe))
    }

    #[test]
    fn the_collector_can_move_to_a_blocking_thread() {
        fn is_send<T: Send>() {}
        is_send::<GpuCollector>();
        is_send::<NvmlProbe>();
    }

    #[test]
    fn two_gpus_are_reported_with_every_field_in_its_unit() {
        let mut d0 = device(0);
        d0.utilization_gpu_percent = 87;
        d0.utilization_memory_percent = 41;
        d0.memory_used_bytes = 30 * GIB;
        d0.memory_total_bytes = 80 * GIB;
        d0.power_draw_milliwatts = 612_345;
        d0.power_limit_milliwatts = 700_000;
        d0.temperature_celsius = 64;
        let d0 = d0.with_process(process(4242, 29 * GIB).sm(75));
        let d1 = device(1).with_process(process(777, GIB).graphics());
        let probe = ScriptedProbe::new()
            .with_driver_version("550.54.15")
            .then_ok(vec![d0, d1]);
        let mut c = collector(probe);

        let r = c.sample(Instant::now());

        assert_eq!(r.availability(), Availability::Available);
        assert_eq!(r.state.reason, "");
        assert_eq!(r.state.driver_version, "550.54.15");
        assert_eq!(r.devices.len(), 2);
        let g0 = &r.devices[0];
        assert_eq!(g0.index, 0);
        assert_eq!(g0.uuid, device(0).uuid);
        assert_eq!(g0.name, "NVIDIA H100 80GB HBM3");
        assert_eq!(g0.pci_bus_id, "00000000:17:00.0");
        assert_eq!(g0.utilization_gpu_percent, 87);
        assert_eq!(g0.utilization_memory_percent, 41);
        assert_eq!(g0.memory_used_bytes, 32_212_254_720);
        assert_eq!(g0.memory_total_bytes, 85_899_345_920);
        assert_eq!(g0.power_draw_milliwatts, 612_345);
        assert_eq!(g0.power_limit_milliwatts, 700_000);
        assert_eq!(g0.temperature_celsius, 64);
        assert!(!g0.mig_enabled);
        assert_eq!(g0.error, "");
        assert_eq!(g0.processes.len(), 1);
        assert_eq!(g0.processes[0].pid, 4242);
        assert_eq!(g0.processes[0].used_memory_bytes, 29 * GIB);
        assert_eq!(g0.processes[0].sm_percent, Some(75));
        assert_eq!(g0.processes[0].kind, "compute");
        let g1 = &r.devices[1];
        assert_eq!(g1.index, 1);
        assert_ne!(g1.uuid, g0.uuid);
        assert_eq!(g1.pci_bus_id, "00000000:18:00.0");
        assert_eq!(g1.processes[0].kind, "graphics");
        assert_eq!(g1.processes[0].sm_percent, None);
        assert_eq!(r.pids(), vec![777, 4242]);
    }

    #[test]
    fn mig_instances_and_a_process_on_one_are_reported() {
        let d = device(0)
            .with_mig(mig(&device(0).uuid, 1, 0, 10 * GIB, 2 * GIB))
            .with_mig(mig(&device(0).uuid, 2, 0, 10 * GIB, 0))
            .with_process(process(900, 2 * GIB).on_mig(&mig(&device(0).uuid, 1, 0, 0, 0).uuid));
        let mut c = collector(ScriptedProbe::new().then_ok(vec![d]));

        let r = c.sample(Instant::now());

        let g = &r.devices[0];
        assert!(g.mig_enabled);
        assert_eq!(g.mig_instances.len(), 2);
        assert_eq!(g.mig_instances[0].gpu_instance_id, 1);
        assert_eq!(g.mig_instances[0].compute_instance_id, 0);
        assert_eq!(g.mig_instances[0].memory_total_bytes, 10 * GIB);
        assert_eq!(g.mig_instances[0].memory_used_bytes, 2 * GIB);
        assert_eq!(g.mig_instances[1].gpu_instance_id, 2);
        assert_eq!(g.processes.len(), 1);
        assert_eq!(g.processes[0].pid, 900);
        assert_eq!(g.processes[0].mig_uuid, g.mig_instances[0].uuid);
        assert!(!g.processes[0].mig_uuid.is_empty());
    }

    #[test]
    fn gpu_seconds_follow_elapsed_time_and_sm_share_as_processes_come_and_go() {
        let t0 = Instant::now();
        let probe = ScriptedProbe::new()
            // t0: pid 10 at 50 %.
            .then_ok(vec![device(0).with_process(process(10, GIB).sm(50))])
            // t0+10: pid 10 at 50 %, pid 20 appeared (no share: resident = 1).
            .then_ok(vec![
                device(0)
                    .with_process(process(10, GIB).sm(50))
                    .with_process(process(20, GIB)),
            ])
            // t0+30: pid 10 left; pid 20 at 25 %.
            .then_ok(vec![device(0).with_process(process(20, GIB).sm(25))]);
        let mut c = collector(probe);

        let r0 = c.sample(t0);
        assert_eq!(r0.devices[0].processes[0].gpu_seconds, 0.0);
        assert_eq!(c.total_gpu_seconds(10), Some(0.0));

        let r1 = c.sample(t0 + secs(10));
        let p = &r1.devices[0].processes;
        assert!(close(p[0].gpu_seconds, 5.0), "{}", p[0].gpu_seconds);
        assert!(close(p[1].gpu_seconds, 10.0), "{}", p[1].gpu_seconds);
        assert_eq!(c.total_gpu_seconds(10), Some(5.0));
        assert_eq!(c.total_gpu_seconds(20), Some(10.0));

        let r2 = c.sample(t0 + secs(30));
        let p = &r2.devices[0].processes;
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].pid, 20);
        assert!(close(p[0].gpu_seconds, 5.0), "{}", p[0].gpu_seconds);
        assert_eq!(c.total_gpu_seconds(10), None);
        assert_eq!(c.total_gpu_seconds(20), Some(15.0));
        assert_eq!(r2.pids(), vec![20]);
    }

    #[test]
    fn a_process_listed_as_compute_and_graphics_is_charged_once() {
        let t0 = Instant::now();
        let d = device(0)
            .with_process(process(5, GIB))
            .with_process(process(5, GIB).graphics());
        let mut c = collector(ScriptedProbe::new().then_ok(vec![d]));
        c.sample(t0);
        let r = c.sample(t0 + secs(4));
        let charged: f64 = r.devices[0].processes.iter().map(|p| p.gpu_seconds).sum();
        assert!(close(charged, 4.0), "{charged}");
        assert_eq!(c.total_gpu_seconds(5), Some(4.0));
    }

    #[test]
    fn a_device_that_stops_answering_is_flagged_while_the_other_is_still_reported() {
        let t0 = Instant::now();
        let healthy = || {
            vec![
                device(0).with_process(process(1, GIB)),
                device(1).with_process(process(2, GIB)),
            ]
        };
        let lost = DeviceReading {
            index: 0,
            error: Some("device fell off the bus".to_owned()),
            ..DeviceReading::default()
        };
        let probe = ScriptedProbe::new()
            .then_ok(healthy())
            .then_ok(vec![lost, device(1).with_process(process(2, GIB))])
            .then_ok(healthy());
        let mut c = collector(probe);

        let r0 = c.sample(t0);
        assert_eq!(r0.devices[0].error, "");

        let r1 = c.sample(t0 + secs(10));
        assert_eq!(r1.availability(), Availability::Available);
        assert_eq!(r1.devices.len(), 2);
        assert_eq!(r1.devices[0].error, "device fell off the bus");
        assert_eq!(
            r1.devices[0].uuid,
            device(0).uuid,
            "identity kept from before"
        );
        assert!(r1.devices[0].processes.is_empty());
        assert_eq!(r1.devices[1].error, "");
        assert_eq!(r1.devices[1].processes[0].pid, 2);
        assert_eq!(c.total_gpu_seconds(1), None);
        assert_eq!(c.total_gpu_seconds(2), Some(10.0));

        let r2 = c.sample(t0 + secs(20));
        assert_eq!(r2.devices[0].error, "");
        assert_eq!(r2.devices[0].processes[0].pid, 1);
        assert!(close(r2.devices[0].processes[0].gpu_seconds, 10.0));
        assert_eq!(c.total_gpu_seconds(1), Some(10.0));
    }

    #[test]
    fn a_missing_library_is_unavailable_with_its_reason_and_retried_only_after_the_interval() {
        let t0 = Instant::now();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let factory: ProbeFactory = Box::new(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            if n < 2 {
                Err(ProbeError::Unavailable(
                    "NVML unavailable: libnvidia-ml.so.1: cannot open shared object file"
                        .to_owned(),
                ))
            } else {
                let probe = ScriptedProbe::new()
                    .with_driver_version("550.54.15")
                    .then_ok(vec![device(0).with_process(process(3, GIB))]);
                Ok(Box::new(probe) as Box<dyn GpuProbe>)
            }
        });
        let mut c = GpuCollector::with_factory(factory, secs(60));

        let r = c.sample(t0);
        assert_eq!(r.availability(), Availability::Unavailable);
        assert!(r.state.reason.contains("libnvidia-ml.so.1"), "{r:?}");
        assert!(r.devices.is_empty());
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let r = c.sample(t0 + secs(30));
        assert_eq!(r.availability(), Availability::Unavailable);
        assert!(r.state.reason.contains("libnvidia-ml.so.1"));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no retry before the interval"
        );

        let r = c.sample(t0 + secs(60));
        assert_eq!(r.availability(), Availability::Unavailable);
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let r = c.sample(t0 + secs(100));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(r.availability(), Availability::Unavailable);

        let r = c.sample(t0 + secs(120));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(r.availability(), Availability::Available);
        assert_eq!(r.state.reason, "");
        assert_eq!(r.state.driver_version, "550.54.15");
        assert_eq!(r.devices.len(), 1);
        assert_eq!(
            r.devices[0].processes[0].gpu_seconds, 0.0,
            "the outage is charged to nobody"
        );

        c.sample(t0 + secs(130));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "initialised once, not per sample"
        );
        assert_eq!(c.total_gpu_seconds(3), Some(10.0));
    }

    #[test]
    fn a_driver_error_drops_the_probe_and_recreates_it_after_the_interval() {
        let t0 = Instant::now();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let factory: ProbeFactory = Box::new(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let probe = if n == 0 {
                ScriptedProbe::new()
                    .then_ok(vec![device(0).with_process(process(8, GIB))])
                    .then_err(ProbeError::Driver(
                        "an internal driver error occured".into(),
                    ))
            } else {
                ScriptedProbe::new().then_ok(vec![device(0)])
            };
            Ok(Box::new(probe) as Box<dyn GpuProbe>)
        });
        let mut c = GpuCollector::with_factory(factory, secs(60));

        assert_eq!(c.sample(t0).availability(), Availability::Available);
        assert_eq!(c.total_gpu_seconds(8), Some(0.0));
        let r = c.sample(t0 + secs(10));
        assert_eq!(r.availability(), Availability::Unavailable);
        assert_eq!(
            r.state.reason,
            "gpu driver error: an internal driver error occured"
        );
        assert_eq!(c.total_gpu_seconds(8), None);
        assert_eq!(
            c.sample(t0 + secs(20)).availability(),
            Availability::Unavailable
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            c.sample(t0 + secs(70)).availability(),
            Availability::Available
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failing_probe_given_directly_is_asked_again_after_the_interval() {
        let t0 = Instant::now();
        let probe = ScriptedProbe::new()
            .then_err(ProbeError::Unavailable(
                "NVIDIA driver is not loaded".into(),
            ))
            .then_ok(vec![device(0)]);
        let mut c = collector(probe);
        c.set_retry_interval(secs(5));

        let r = c.sample(t0);
        assert_eq!(r.availability(), Availability::Unavailable);
        assert_eq!(r.state.reason, "NVIDIA driver is not loaded");
        // Still inside the interval: the script is not advanced, the failure repeats.
        assert_eq!(
            c.sample(t0 + secs(4)).availability(),
            Availability::Unavailable
        );
        assert_eq!(
            c.sample(t0 + secs(5)).availability(),
            Availability::Available
        );
    }

    #[test]
    fn no_devices_is_its_own_state_and_is_asked_again_at_the_next_sample() {
        let t0 = Instant::now();
        let probe = ScriptedProbe::new()
            .with_driver_version("550.54.15")
            .then_err(ProbeError::NoDevices)
            .then_ok(Vec::new())
            .then_ok(vec![device(0)]);
        let mut c = collector(probe);

        let r = c.sample(t0);
        assert_eq!(r.availability(), Availability::NoDevices);
        assert_eq!(r.state.driver_version, "550.54.15");
        assert!(r.devices.is_empty());
        assert_eq!(
            c.sample(t0 + secs(1)).availability(),
            Availability::NoDevices
        );
        assert_eq!(
            c.sample(t0 + secs(2)).availability(),
            Availability::Available
        );
    }

    #[test]
    fn nvml_on_a_machine_without_it_says_why_and_does_not_panic() {
        let t0 = Instant::now();
        let mut c = GpuCollector::nvml();
        let r = c.sample(t0);
        match r.availability() {
            Availability::Unavailable => {
                assert!(!r.state.reason.is_empty());
                assert!(r.state.reason.contains("NVML"), "{}", r.state.reason);
                assert!(r.devices.is_empty());
                // Within the retry interval the same answer comes back without a new attempt.
                let again = c.sample(t0 + secs(1));
                assert_eq!(again.state.reason, r.state.reason);
            }
            // A machine with NVML (a GPU node) answers for real.
            Availability::Available => assert!(!r.devices.is_empty()),
            Availability::NoDevices => assert!(r.devices.is_empty()),
            Availability::Unspecified => panic!("state must be set: {r:?}"),
        }
    }
}
