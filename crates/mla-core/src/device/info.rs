//! What a device is and how it is opened, as plain data: the CUDA runtime (`crate::gpu`)
//! fills these in, [`Device`](super::Device) hands them out. Imports only the kernel-path
//! names, so the runtime can use it without importing the module that wraps the runtime.

use crate::gpu::path::KernelPath;

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// "cpu" or "cuda".
    pub kind: &'static str,
    pub name: String,
    pub ordinal: usize,
    /// (major, minor); (0, 0) on the CPU backend.
    pub compute_capability: (i32, i32),
    /// The kernels a CUDA device runs; `None` on the CPU backend.
    pub kernel_path: Option<KernelPath>,
    /// Multiprocessors on CUDA; worker threads on the CPU backend.
    pub multiprocessors: usize,
    pub total_memory: u64,
}

/// The oldest CUDA version a driver must support: the kernels are cubins from a CUDA 12
/// compiler, which a driver loads within CUDA 12 minor-version compatibility (R525.60.13
/// and later on Linux), and the driver API calls are bound at the CUDA 12.0 level.
pub const MIN_DRIVER_CUDA_VERSION: (i32, i32) = (12, 0);

/// How [`Device::cuda_with`](super::Device::cuda_with) opens a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceOptions {
    /// The portable kernels even where the Hopper ones would run (what `MLA_FORCE_PORTABLE=1`
    /// does): a cubin of the device's architecture when the build has one, else the
    /// compute_80 PTX (on Hopper: the PTX, JIT-compiled at open).
    pub force_portable: bool,
    /// Exactly this path, or a typed error when the device or the build cannot run it;
    /// takes precedence over `force_portable` and `MLA_FORCE_PORTABLE`.
    pub kernel_path: Option<KernelPath>,
}

/// One visible CUDA device in [`GpuStatus`].
#[derive(Debug, Clone)]
pub struct GpuDeviceStatus {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// The path [`Device::cuda`](super::Device::cuda) would open it on (`MLA_FORCE_PORTABLE` included); `None`
    /// when it cannot be opened, with `reason` saying why.
    pub kernel_path: Option<KernelPath>,
    /// The target of the modules it would load (`sm_90a`, `sm_86`, `compute_80`).
    pub kernel_target: Option<&'static str>,
    pub reason: Option<String>,
}

/// Whether a CUDA GPU can be used, and why not.
#[derive(Debug, Clone)]
pub struct GpuStatus {
    /// A visible device can be opened (it has a kernel path) and this build has kernels.
    pub available: bool,
    pub device_count: usize,
    pub kernels_built: bool,
    /// The compiler that built the kernels (e.g. `NVRTC 12.9 + ptxas 12.9.86 (repo .cuda)`);
    /// empty when none were built.
    pub kernels_compiler: &'static str,
    /// The embedded targets: cubins (`sm_80`, `sm_86`, `sm_89`, `sm_90a`, `sm_120`) and PTX
    /// (`compute_80`); empty without kernels.
    pub kernel_targets: Vec<&'static str>,
    /// Every visible device and the path it would use.
    pub devices: Vec<GpuDeviceStatus>,
    /// The CUDA version the installed driver supports (cuDriverGetVersion), as (major,
    /// minor); `None` without a driver. Below [`MIN_DRIVER_CUDA_VERSION`] the GPU path
    /// reports `ERR_DRIVER_TOO_OLD`.
    pub driver_version: Option<(i32, i32)>,
    /// Why the GPU path is unusable, when it is.
    pub reason: Option<String>,
}
