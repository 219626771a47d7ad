//! Where work runs: the CPU backend or one CUDA device.

use std::sync::Arc;

use crate::error::Result;
use crate::gpu::{self, GpuDevice};

#[derive(Clone)]
pub enum Device {
    /// The multi-threaded CPU backend (host memory).
    Cpu,
    /// One CUDA device (sm_90a kernels).
    Cuda(Arc<GpuDevice>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// "cpu" or "cuda".
    pub kind: &'static str,
    pub name: String,
    pub ordinal: usize,
    /// (major, minor); (0, 0) on the CPU backend.
    pub compute_capability: (i32, i32),
    /// Multiprocessors on CUDA; worker threads on the CPU backend.
    pub multiprocessors: usize,
    pub total_memory: u64,
}

impl Device {
    pub fn cpu() -> Device {
        Device::Cpu
    }

    /// Opens CUDA device `ordinal`. Fails with `ERR_GPU_UNAVAILABLE` (no driver, no such
    /// device, not sm_90), `ERR_DRIVER_TOO_OLD` (a driver older than CUDA 12.0) or
    /// `ERR_KERNELS_UNAVAILABLE` (built without a CUDA compiler): never falls back to the
    /// CPU silently.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device::Cuda(GpuDevice::open(ordinal)?))
    }

    /// CUDA device 0 when it is usable, else the CPU backend.
    pub fn best() -> Device {
        Device::cuda(0).unwrap_or(Device::Cpu)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    pub fn info(&self) -> DeviceInfo {
        match self {
            Device::Cpu => DeviceInfo {
                kind: "cpu",
                name: format!("CPU backend ({} threads)", rayon::current_num_threads()),
                ordinal: 0,
                compute_capability: (0, 0),
                multiprocessors: rayon::current_num_threads(),
                total_memory: 0,
            },
            Device::Cuda(g) => g.info().clone(),
        }
    }

    /// Waits for all queued work; on CUDA also reports errors that kernels flagged on the
    /// device (a bad device-resident block index or sequence length, a plan that does not
    /// fit the lengths) as typed errors, and clears them.
    ///
    /// The flag is one per device: when several threads decode on one device, use
    /// [`Device::run_step`], so that each error reaches the step that caused it.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(g) => g.synchronize(),
        }
    }

    /// Runs `enqueue` (which queues work, e.g. `decode`), waits for the device and reports
    /// the errors the kernels flagged, as one step that no other `run_step` or
    /// `synchronize` on this device interleaves with.
    pub fn run_step<T>(&self, enqueue: impl FnOnce() -> Result<T>) -> Result<T> {
        match self {
            Device::Cpu => enqueue(),
            Device::Cuda(g) => g.run_step(enqueue),
        }
    }

    /// Two handles to the same device.
    pub fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => Arc::ptr_eq(a, b) || a.ordinal() == b.ordinal(),
            _ => false,
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "Device::Cpu"),
            Device::Cuda(g) => write!(f, "Device::Cuda({})", g.ordinal()),
        }
    }
}

/// The oldest CUDA version a driver must support: the kernels are cubins from a CUDA 12
/// compiler, which a driver loads within CUDA 12 minor-version compatibility (R525.60.13
/// and later on Linux), and the driver API calls are bound at the CUDA 12.0 level.
pub const MIN_DRIVER_CUDA_VERSION: (i32, i32) = (12, 0);

/// Whether a CUDA GPU can be used, and why not.
#[derive(Debug, Clone)]
pub struct GpuStatus {
    pub available: bool,
    pub device_count: usize,
    pub kernels_built: bool,
    /// The compiler that built the kernels (e.g. `NVRTC 12.9 + ptxas 12.9.86 (repo .cuda)`);
    /// empty when none were built.
    pub kernels_compiler: &'static str,
    /// The CUDA version the installed driver supports (cuDriverGetVersion), as (major,
    /// minor); `None` without a driver. Below [`MIN_DRIVER_CUDA_VERSION`] the GPU path
    /// reports `ERR_DRIVER_TOO_OLD`.
    pub driver_version: Option<(i32, i32)>,
    /// Why the GPU path is unusable, when it is.
    pub reason: Option<String>,
}

pub fn gpu_status() -> GpuStatus {
    gpu::status()
}
