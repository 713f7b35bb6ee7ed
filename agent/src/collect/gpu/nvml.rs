//! [`NvmlProbe`]: GPUs through NVML (nvml-wrapper), loaded at run time.
//!
//! NVML is initialised once, in [`NvmlProbe::new`], and shut down when the probe is dropped.
//! Per device it reads identity, utilisation, memory, power, temperature, MIG mode, the compute
//! and graphics processes and their SM share from the driver's per-process samples.
//!
//! Failures are sorted three ways:
//! - a field the device, driver or permissions do not give (`NotSupported`, a missing symbol in
//!   an older library, `NoPermission`, `NotFound`, `NoData`) is left at zero / absent;
//! - any other error on one device (`GpuLost`, `Unknown`, `ResetRequired`, …) marks that device
//!   with `error`, keeps what was read before, and the other devices are still read;
//! - a failure of NVML as a whole (device count) fails the snapshot.
//!
//! MIG: nvml-wrapper 0.11 offers `mig_mode` but no safe call for MIG device handles, so MIG
//! instances are derived from the processes' GPU / compute instance ids: an instance appears
//! when a process runs on it, named with [`super::mig_id`], its used memory the sum of its
//! processes' memory and its total memory unknown (0).

use std::collections::{BTreeMap, HashMap};

use nvml_wrapper::Device;
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;

use super::{DeviceReading, GpuProbe, MigReading, ProbeError, ProcessKind, ProcessReading, mig_id};

/// `MigMode.current` when MIG is enabled (`NVML_DEVICE_MIG_ENABLE`).
const MIG_ENABLED: u32 = 1;

/// A live NVML session.
#[derive(Debug)]
pub struct NvmlProbe {
    nvml: Nvml,
    driver_version: Option<String>,
    /// Per device index, the newest per-process utilisation sample already read (CPU µs), so
    /// each snapshot reads the samples since the previous one.
    last_sample_us: HashMap<u32, u64>,
}

impl NvmlProbe {
    /// Loads `libnvidia-ml.so.1` and initialises NVML. Fails with
    /// [`ProbeError::Unavailable`] ("NVML unavailable: …", the library's own words) when the
    /// library is missing, the driver is not loaded or access is refused.
    pub fn new() -> Result<Self, ProbeError> {
        let nvml = Nvml::init().map_err(|err| {
            // The loader's own words name the library and the cause.
            let why = match &err {
                NvmlError::LibloadingError(load) => load.to_string(),
                other => other.to_string(),
            };
            ProbeError::Unavailable(format!("NVML unavailable: {why}"))
        })?;
        let driver_version = nvml.sys_driver_version().ok();
        Ok(Self {
            nvml,
            driver_version,
            last_sample_us: HashMap::new(),
        })
    }

    /// Reads device `index` into `out`; stops at the first error that is not "not supported".
    fn read_device(&mut self, index: u32, out: &mut DeviceReading) -> Result<(), NvmlError> {
        let device = self.nvml.device_by_index(index)?;
        let last_sample_us = &mut self.last_sample_us;
        if let Some(uuid) = optional(device.uuid())? {
            out.uuid = uuid;
        }
        if let Some(name) = optional(device.name())? {
            out.name = name;
        }
        if let Some(pci) = optional(device.pci_info())? {
            out.pci_bus_id = pci.bus_id;
        }
        if let Some(util) = optional(device.utilization_rates())? {
            out.utilization_gpu_percent = util.gpu;
            out.utilization_memory_percent = util.memory;
        }
        if let Some(mem) = optional(device.memory_info())? {
            out.memory_used_bytes = mem.used;
            out.memory_total_bytes = mem.total;
        }
        if let Some(mw) = optional(device.power_usage())? {
            out.power_draw_milliwatts = mw;
        }
        let limit = match optional(device.enforced_power_limit())? {
            Some(mw) => Some(mw),
            None => optional(device.power_management_limit())?,
        };
        out.power_limit_milliwatts = limit.unwrap_or(0);
        if let Some(c) = optional(device.temperature(TemperatureSensor::Gpu))? {
            out.temperature_celsius = c;
        }
        if let Some(mode) = optional(device.mig_mode())? {
            out.mig_enabled = mode.current == MIG_ENABLED;
        }

        // `_v3` calls (driver 510+); older drivers lack the symbol and list no process (the
        // `_v2` fallback needs nvml-wrapper's `legacy-functions` feature).
        let compute = optional(device.running_compute_processes())?.unwrap_or_default();
        let graphics = optional(device.running_graphics_processes())?.unwrap_or_default();
        let sm = sm_shares(last_sample_us, index, &device)?;
        out.processes = merge_processes(&out.uuid, compute, graphics, &sm);
        if out.mig_enabled {
            out.mig_instances = mig_instances(&out.uuid, &out.processes);
        }
        Ok(())
    }
}

/// Mean SM share per pid over the driver's samples since the previous snapshot (remembered in
/// `last_sample_us`); empty when the device gives none.
fn sm_shares(
    last_sample_us: &mut HashMap<u32, u64>,
    index: u32,
    device: &Device<'_>,
) -> Result<HashMap<u32, u32>, NvmlError> {
    let since = last_sample_us.get(&index).copied();
    let Some(samples) = optional(device.process_utilization_stats(since))? else {
        return Ok(HashMap::new());
    };
    let mut sums: HashMap<u32, (u64, u64)> = HashMap::new();
    let mut newest = since.unwrap_or(0);
    for s in &samples {
        newest = newest.max(s.timestamp);
        let e = sums.entry(s.pid).or_insert((0, 0));
        e.0 += u64::from(s.sm_util.min(100));
        e.1 += 1;
    }
    last_sample_us.insert(index, newest);
    Ok(sums
        .into_iter()
        .map(|(pid, (sum, n))| (pid, u32::try_from(sum / n.max(1)).unwrap_or(100)))
        .collect())
}

impl GpuProbe for NvmlProbe {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn snapshot(&mut self) -> Result<Vec<DeviceReading>, ProbeError> {
        let count = self.nvml.device_count().map_err(whole_error)?;
        if count == 0 {
            return Err(ProbeError::NoDevices);
        }
        let mut devices = Vec::new();
        for index in 0..count {
            let mut reading = DeviceReading {
                index,
                ..DeviceReading::default()
            };
            if let Err(err) = self.read_device(index, &mut reading) {
                tracing::debug!(index, error = %err, "gpu device did not answer");
                reading.error = Some(err.to_string());
            }
            devices.push(reading);
        }
        Ok(devices)
    }

    fn driver_version(&self) -> Option<String> {
        self.driver_version.clone()
    }
}

/// An error that means "this field is not available here", not "the device failed".
fn is_absent(err: &NvmlError) -> bool {
    matches!(
        err,
        NvmlError::NotSupported
            | NvmlError::FunctionNotFound
            | NvmlError::FailedToLoadSymbol(_)
            | NvmlError::NoPermission
            | NvmlError::NotFound
            | NvmlError::NoData
    )
}

/// `Ok(None)` for a field that is not available, the error for a device failure.
fn optional<T>(result: Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(err) if is_absent(&err) => Ok(None),
        Err(err) => Err(err),
    }
}

/// A failure of NVML as a whole.
fn whole_error(err: NvmlError) -> ProbeError {
    match err {
        NvmlError::Uninitialized
        | NvmlError::DriverNotLoaded
        | NvmlError::NoPermission
        | NvmlError::LibRmVersionMismatch
        | NvmlError::LibraryNotFound
        | NvmlError::FailedToLoadSymbol(_)
        | NvmlError::FunctionNotFound => {
            ProbeError::Unavailable(format!("NVML unavailable: {err}"))
        }
        other => ProbeError::Driver(other.to_string()),
    }
}

/// One entry per (pid, MIG instance): a process with both a compute and a graphics context is
/// listed once, as compute.
fn merge_processes(
    parent_uuid: &str,
    compute: Vec<ProcessInfo>,
    graphics: Vec<ProcessInfo>,
    sm: &HashMap<u32, u32>,
) -> Vec<ProcessReading> {
    let mut out: Vec<ProcessReading> = Vec::with_capacity(compute.len() + graphics.len());
    let tagged = compute
        .into_iter()
        .map(|p| (p, ProcessKind::Compute))
        .chain(graphics.into_iter().map(|p| (p, ProcessKind::Graphics)));
    for (p, kind) in tagged {
        let mig_uuid = match (p.gpu_instance_id, p.compute_instance_id) {
            (Some(gi), Some(ci)) => mig_id(parent_uuid, gi, ci),
            _ => String::new(),
        };
        if out.iter().any(|o| o.pid == p.pid && o.mig_uuid == mig_uuid) {
            continue;
        }
        out.push(ProcessReading {
            pid: p.pid,
            used_memory_bytes: match p.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => bytes,
                UsedGpuMemory::Unavailable => 0,
            },
            sm_percent: sm.get(&p.pid).copied(),
            kind,
            mig_uuid,
        });
    }
    out
}

/// The MIG instances that processes run on, with the memory those processes hold.
fn mig_instances(parent_uuid: &str, processes: &[ProcessReading]) -> Vec<MigReading> {
    let mut by_id: BTreeMap<(u32, u32), MigReading> = BTreeMap::new();
    for p in processes {
        let Some((gi, ci)) = parse_mig_id(parent_uuid, &p.mig_uuid) else {
            continue;
        };
        let m = by_id.entry((gi, ci)).or_insert_with(|| MigReading {
            uuid: p.mig_uuid.clone(),
            gpu_instance_id: gi,
            compute_instance_id: ci,
            memory_total_bytes: 0,
            memory_used_bytes: 0,
        });
        m.memory_used_bytes = m.memory_used_bytes.saturating_add(p.used_memory_bytes);
    }
    by_id.into_values().collect()
}

fn parse_mig_id(parent_uuid: &str, id: &str) -> Option<(u32, u32)> {
    let rest = id
        .strip_prefix("MIG-")?
        .strip_prefix(parent_uuid)?
        .strip_prefix('/')?;
    let (gi, ci) = rest.split_once('/')?;
    Some((gi.parse().ok()?, ci.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pid: u32, bytes: Option<u64>, mig: Option<(u32, u32)>) -> ProcessInfo {
        ProcessInfo {
            pid,
            used_gpu_memory: bytes.map_or(UsedGpuMemory::Unavailable, UsedGpuMemory::Used),
            gpu_instance_id: mig.map(|m| m.0),
            compute_instance_id: mig.map(|m| m.1),
        }
    }

    #[test]
    fn creating_the_probe_without_the_library_is_an_error_with_the_library_words() {
        match NvmlProbe::new() {
            Err(ProbeError::Unavailable(reason)) => {
                assert!(reason.starts_with("NVML unavailable: "), "{reason}");
                assert!(reason.len() > "NVML unavailable: ".len());
            }
            Err(other) => panic!("expected Unavailable, got {other:?}"),
            // A machine with NVML: creating it is fine.
            Ok(probe) => assert_eq!(probe.name(), "nvml"),
        }
    }

    #[test]
    fn unsupported_fields_are_absent_and_a_lost_gpu_is_an_error() {
        assert!(matches!(
            optional::<u32>(Err(NvmlError::NotSupported)),
            Ok(None)
        ));
        assert!(matches!(
            optional::<u32>(Err(NvmlError::FailedToLoadSymbol("x".into()))),
            Ok(None)
        ));
        assert!(matches!(optional(Ok::<u32, NvmlError>(7)), Ok(Some(7))));
        assert!(matches!(
            optional::<u32>(Err(NvmlError::GpuLost)),
            Err(NvmlError::GpuLost)
        ));
        assert!(matches!(
            optional::<u32>(Err(NvmlError::Unknown)),
            Err(NvmlError::Unknown)
        ));
    }

    #[test]
    fn a_driver_not_loaded_is_unavailable_and_an_internal_error_is_a_driver_error() {
        assert_eq!(
            whole_error(NvmlError::DriverNotLoaded),
            ProbeError::Unavailable("NVML unavailable: NVIDIA driver is not loaded".into())
        );
        assert!(matches!(
            whole_error(NvmlError::Unknown),
            ProbeError::Driver(_)
        ));
    }

    #[test]
    fn processes_are_merged_once_with_their_sm_share_and_memory() {
        let sm = HashMap::from([(1, 40)]);
        let got = merge_processes(
            "GPU-a",
            vec![info(1, Some(100), None), info(2, None, None)],
            vec![info(1, Some(100), None), info(3, Some(5), None)],
            &sm,
        );
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].pid, 1);
        assert_eq!(got[0].kind, ProcessKind::Compute);
        assert_eq!(got[0].sm_percent, Some(40));
        assert_eq!(got[0].used_memory_bytes, 100);
        assert_eq!(got[1].used_memory_bytes, 0, "unavailable memory reads as 0");
        assert_eq!(got[1].sm_percent, None);
        assert_eq!(got[2].kind, ProcessKind::Graphics);
    }

    #[test]
    fn mig_instances_come_from_the_processes_running_on_them() {
        let procs = merge_processes(
            "GPU-a",
            vec![
                info(1, Some(100), Some((2, 0))),
                info(2, Some(50), Some((2, 0))),
                info(3, Some(7), Some((1, 0))),
            ],
            Vec::new(),
            &HashMap::new(),
        );
        assert_eq!(procs[0].mig_uuid, "MIG-GPU-a/2/0");
        let migs = mig_instances("GPU-a", &procs);
        assert_eq!(migs.len(), 2);
        assert_eq!(migs[0].gpu_instance_id, 1);
        assert_eq!(migs[0].memory_used_bytes, 7);
        assert_eq!(migs[1].uuid, "MIG-GPU-a/2/0");
        assert_eq!(migs[1].memory_used_bytes, 150);
        assert_eq!(parse_mig_id("GPU-a", "MIG-GPU-b/1/0"), None);
    }
}
