//! [`ScriptedProbe`]: a [`GpuProbe`] that plays back a script, for tests here, in the agent and
//! end to end. Public (not `cfg(test)`) so other crates' tests can use it.
//!
//! ```
//! use sov_agent::collect::gpu::fake::{device, process};
//! use sov_agent::collect::gpu::{GpuCollector, ProbeError, ScriptedProbe};
//!
//! let probe = ScriptedProbe::new()
//!     .then_ok(vec![device(0).with_process(process(4242, 1 << 30).sm(60))])
//!     .then_err(ProbeError::Driver("an internal driver error occured".into()));
//! let mut gpus = GpuCollector::with_probe(Box::new(probe));
//! let report = gpus.sample(std::time::Instant::now());
//! assert_eq!(report.pids(), vec![4242]);
//! ```

use std::collections::VecDeque;

use super::{DeviceReading, GpuProbe, MigReading, ProbeError, ProcessKind, ProcessReading, mig_id};

/// One scripted answer to [`GpuProbe::snapshot`].
pub type Step = Result<Vec<DeviceReading>, ProbeError>;

/// Returns its script one step per snapshot, then repeats the last step forever.
/// An empty script answers [`ProbeError::NoDevices`].
#[derive(Debug, Clone, Default)]
pub struct ScriptedProbe {
    script: VecDeque<Step>,
    last: Option<Step>,
    driver_version: Option<String>,
}

impl ScriptedProbe {
    /// An empty script.
    pub fn new() -> Self {
        Self::default()
    }

    /// A probe that plays `script` in order.
    pub fn from_script(script: impl IntoIterator<Item = Step>) -> Self {
        Self {
            script: script.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Appends a snapshot that returns `devices`.
    pub fn then_ok(mut self, devices: Vec<DeviceReading>) -> Self {
        self.script.push_back(Ok(devices));
        self
    }

    /// Appends a snapshot that fails with `err`.
    pub fn then_err(mut self, err: ProbeError) -> Self {
        self.script.push_back(Err(err));
        self
    }

    /// The driver version the probe reports.
    pub fn with_driver_version(mut self, version: impl Into<String>) -> Self {
        self.driver_version = Some(version.into());
        self
    }
}

impl GpuProbe for ScriptedProbe {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn snapshot(&mut self) -> Result<Vec<DeviceReading>, ProbeError> {
        if let Some(step) = self.script.pop_front() {
            self.last = Some(step);
        }
        self.last.clone().unwrap_or(Err(ProbeError::NoDevices))
    }

    fn driver_version(&self) -> Option<String> {
        self.driver_version.clone()
    }
}

/// A healthy, idle H100 at `index`: uuid `GPU-00000000-0000-0000-0000-<index>`, PCI bus
/// `0x17 + index`, 80 GiB, 70 W of 700 W, 35 °C, no process.
pub fn device(index: u32) -> DeviceReading {
    DeviceReading {
        index,
        uuid: format!("GPU-00000000-0000-0000-0000-{index:012x}"),
        name: "NVIDIA H100 80GB HBM3".to_owned(),
        pci_bus_id: format!("00000000:{:02X}:00.0", 0x17 + index),
        utilization_gpu_percent: 0,
        utilization_memory_percent: 0,
        memory_used_bytes: 512 << 20,
        memory_total_bytes: 80 << 30,
        power_draw_milliwatts: 70_000,
        power_limit_milliwatts: 700_000,
        temperature_celsius: 35,
        mig_enabled: false,
        mig_instances: Vec::new(),
        processes: Vec::new(),
        error: None,
    }
}

/// A compute process holding `used_memory_bytes`, with no SM share from the driver.
pub fn process(pid: u32, used_memory_bytes: u64) -> ProcessReading {
    ProcessReading {
        pid,
        used_memory_bytes,
        sm_percent: None,
        kind: ProcessKind::Compute,
        mig_uuid: String::new(),
    }
}

/// A MIG instance of the GPU `parent_uuid`, named with [`mig_id`].
pub fn mig(
    parent_uuid: &str,
    gpu_instance_id: u32,
    compute_instance_id: u32,
    memory_total_bytes: u64,
    memory_used_bytes: u64,
) -> MigReading {
    MigReading {
        uuid: mig_id(parent_uuid, gpu_instance_id, compute_instance_id),
        gpu_instance_id,
        compute_instance_id,
        memory_total_bytes,
        memory_used_bytes,
    }
}

impl DeviceReading {
    /// Adds a process on this device.
    pub fn with_process(mut self, process: ProcessReading) -> Self {
        self.processes.push(process);
        self
    }

    /// Adds a MIG instance and turns MIG mode on.
    pub fn with_mig(mut self, instance: MigReading) -> Self {
        self.mig_enabled = true;
        self.mig_instances.push(instance);
        self
    }

    /// Marks the device as no longer answering.
    pub fn failed(mut self, error: impl Into<String>) -> Self {
        self.error = Some(error.into());
        self
    }
}

impl ProcessReading {
    /// Sets the driver's SM share, 0-100.
    pub fn sm(mut self, percent: u32) -> Self {
        self.sm_percent = Some(percent);
        self
    }

    /// Makes it a graphics process.
    pub fn graphics(mut self) -> Self {
        self.kind = ProcessKind::Graphics;
        self
    }

    /// Places it on the MIG instance `mig_uuid`.
    pub fn on_mig(mut self, mig_uuid: &str) -> Self {
        mig_uuid.clone_into(&mut self.mig_uuid);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_plays_in_order_then_repeats_its_last_step() {
        let mut p = ScriptedProbe::new()
            .then_err(ProbeError::NoDevices)
            .then_ok(vec![device(0), device(1)]);
        assert_eq!(p.snapshot(), Err(ProbeError::NoDevices));
        assert_eq!(p.snapshot().map(|d| d.len()), Ok(2));
        assert_eq!(p.snapshot().map(|d| d.len()), Ok(2));
    }

    #[test]
    fn an_empty_script_has_no_devices() {
        let mut p = ScriptedProbe::new();
        assert_eq!(p.snapshot(), Err(ProbeError::NoDevices));
        assert_eq!(p.driver_version(), None);
    }

    #[test]
    fn devices_made_by_the_helpers_are_distinct() {
        assert_ne!(device(0).uuid, device(1).uuid);
        assert_eq!(device(1).pci_bus_id, "00000000:18:00.0");
        let d = device(0).failed("gone");
        assert_eq!(d.error.as_deref(), Some("gone"));
    }
}
