//! `Device`: the CPU backend or one CUDA device.

use mla_core::{DType, ErrorCode};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::error::{core, disposed, err, Result};
use crate::plan::Plan;
use crate::task::CoreTask;
use crate::tensor::Tensor;

/// Whether the CUDA path can be used, and why not.
#[napi(object)]
pub struct GpuStatus {
    pub available: bool,
    pub device_count: u32,
    pub kernels_built: bool,
    /// The compiler of the kernels; None when none were built.
    pub kernels_compiler: Option<String>,
    /// [major, minor] CUDA version of the driver; None without a driver.
    pub driver_version: Option<Vec<i32>>,
    /// The embedded kernel targets: cubins ("sm_80", ..., "sm_120") and PTX ("compute_80").
    pub kernel_targets: Vec<String>,
    /// Every visible CUDA device and the kernel path it would use.
    pub devices: Vec<GpuDeviceStatus>,
    pub reason: Option<String>,
}

/// One visible CUDA device (`mla_core::device::GpuDeviceStatus`).
#[napi(object)]
pub struct GpuDeviceStatus {
    pub ordinal: u32,
    pub name: String,
    pub compute_capability: Vec<i32>,
    /// "hopper", "portable" or "portable-ptx"; None when the device cannot be opened.
    pub kernel_path: Option<String>,
    /// "sm_90a", "sm_86", "compute_80", ...
    pub kernel_target: Option<String>,
    pub reason: Option<String>,
}

/// Options of `Device.open` (native side of `DeviceOpenOptions` in src/device.ts).
#[napi(object)]
pub struct DeviceOpenOptions {
    /// The portable kernels even on Hopper (as MLA_FORCE_PORTABLE=1).
    pub portable: Option<bool>,
    /// Exactly this path: "hopper", "portable" or "portable-ptx".
    pub kernel_path: Option<String>,
}

/// `mla_core::device::gpu_status()`.
#[napi]
pub fn gpu_status() -> Result<GpuStatus> {
    let s = core(|| Ok(mla_core::device::gpu_status()))?;
    Ok(GpuStatus {
        available: s.available,
        device_count: s.device_count as u32,
        kernels_built: s.kernels_built,
        kernels_compiler: Some(s.kernels_compiler.to_string()).filter(|c| !c.is_empty()),
        driver_version: s.driver_version.map(|(a, b)| vec![a, b]),
        kernel_targets: s.kernel_targets.iter().map(|t| t.to_string()).collect(),
        devices: s
            .devices
            .into_iter()
            .map(|d| GpuDeviceStatus {
                ordinal: d.ordinal as u32,
                name: d.name,
                compute_capability: vec![d.compute_capability.0, d.compute_capability.1],
                kernel_path: d.kernel_path.map(|p| p.as_str().to_string()),
                kernel_target: d.kernel_target.map(String::from),
                reason: d.reason,
            })
            .collect(),
        reason: s.reason,
    })
}

#[napi(object)]
pub struct DeviceInfo {
    pub kind: String,
    pub name: String,
    pub ordinal: u32,
    /// [major, minor]; [0, 0] on the CPU backend.
    pub compute_capability: Vec<i32>,
    /// "hopper", "portable" or "portable-ptx" on CUDA; None on the CPU backend.
    pub kernel_path: Option<String>,
    /// Multiprocessors on CUDA; worker threads on the CPU backend.
    pub multiprocessors: u32,
    /// Bytes of device memory (0 on the CPU backend).
    pub total_memory: f64,
}

/// A compute device (native side of `Device` in src/device.ts).
#[napi]
pub struct Device {
    inner: Option<mla_core::Device>,
}

impl Device {
    pub fn wrap(d: mla_core::Device) -> Device {
        Device { inner: Some(d) }
    }
    pub fn get(&self) -> Result<&mla_core::Device> {
        self.inner.as_ref().ok_or_else(|| disposed("device"))
    }
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    DType::parse(s).ok_or_else(|| err(ErrorCode::DtypeMismatch, format!("dtype: expected one of 'bf16', 'fp16', 'fp32', 'int32', got '{s}'")))
}

fn dims(shape: &[i64]) -> Result<Vec<usize>> {
    core(|| mla_core::validate::extents(shape))
}

#[napi]
impl Device {
    /// Opens a device: "auto" (CUDA device 0 when usable, else the CPU backend), "cpu",
    /// "cuda" (device 0) or "cuda:N". Asking for CUDA never falls back to the CPU: it
    /// throws ERR_GPU_UNAVAILABLE or ERR_KERNELS_UNAVAILABLE.
    /// `options` (CUDA only): `portable` forces the portable kernels, `kernelPath` asks for
    /// exactly one path.
    #[napi(factory)]
    pub fn open(spec: Option<String>, options: Option<DeviceOpenOptions>) -> Result<Device> {
        let spec = spec.unwrap_or_else(|| "auto".to_string());
        let mut opts = mla_core::DeviceOptions::default();
        if let Some(o) = options {
            opts.force_portable = o.portable.unwrap_or(false);
            if let Some(p) = o.kernel_path {
                opts.kernel_path = Some(
                    mla_core::KernelPath::parse(&p)
                        .ok_or_else(|| err(ErrorCode::InvalidArgument, format!("kernelPath: expected 'hopper', 'portable' or 'portable-ptx', got '{p}'")))?,
                );
            }
        }
        let asked = opts != mla_core::DeviceOptions::default();
        let d = match spec.as_str() {
            // Options name CUDA kernels: 'auto' with options must not quietly open the CPU.
            "auto" if asked => core(|| mla_core::Device::cuda_with(0, opts))?,
            "auto" => core(|| Ok(mla_core::Device::best()))?,
            "cpu" if asked => {
                return Err(err(ErrorCode::InvalidArgument, "options: portable / kernelPath choose CUDA kernels; the 'cpu' device has none".to_string()))
            }
            "cpu" => mla_core::Device::cpu(),
            "cuda" => core(|| mla_core::Device::cuda_with(0, opts))?,
            s => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => core(|| mla_core::Device::cuda_with(n, opts))?,
                None => return Err(err(ErrorCode::InvalidArgument, format!("device: expected 'auto', 'cpu', 'cuda' or 'cuda:<n>', got '{s}'"))),
            },
        };
        Ok(Device::wrap(d))
    }

    /// "cpu" or "cuda".
    #[napi(getter)]
    pub fn kind(&self) -> Result<String> {
        Ok(self.get()?.kind().to_string())
    }

    #[napi(getter)]
    pub fn info(&self) -> Result<DeviceInfo> {
        let i = self.get()?.info();
        Ok(DeviceInfo {
            kind: i.kind.to_string(),
            name: i.name,
            ordinal: i.ordinal as u32,
            compute_capability: vec![i.compute_capability.0, i.compute_capability.1],
            kernel_path: i.kernel_path.map(|p| p.as_str().to_string()),
            multiprocessors: i.multiprocessors as u32,
            total_memory: i.total_memory as f64,
        })
    }

    #[napi(getter)]
    pub fn disposed(&self) -> bool {
        self.inner.is_none()
    }

    /// Whether `other` is the same device (same backend and ordinal).
    #[napi]
    pub fn same(&self, other: &Device) -> Result<bool> {
        Ok(self.get()?.same(other.get()?))
    }

    /// Waits for queued work on the libuv thread pool; reports device-side errors.
    #[napi]
    pub fn synchronize(&self) -> Result<AsyncTask<SyncTask>> {
        Ok(sync_task(self.get()?.clone(), None))
    }

    #[napi]
    pub fn synchronize_sync(&self) -> Result<()> {
        mla_core::trace::mark("native:enter");
        let d = self.get()?;
        let r = core(|| d.synchronize());
        mla_core::trace::mark("native:exit");
        r
    }

    /// Waits (on the libuv thread pool) until step `step` has completed; rejects with its own
    /// error when it failed.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn wait_step(&self, step: i64) -> Result<AsyncTask<SyncTask>> {
        Ok(sync_task(self.get()?.clone(), Some(step_id(step)?)))
    }

    /// `waitStep` on the calling thread.
    #[napi]
    pub fn wait_step_sync(&self, step: i64) -> Result<()> {
        let d = self.get()?;
        let id = step_id(step)?;
        core(|| d.wait_step(id))
    }

    /// Memory and step-log facts (`mla_core::Device::memory_stats`).
    #[napi]
    pub fn memory_stats(&self) -> Result<MemoryStats> {
        let m = self.get()?.memory_stats();
        let g = m.gpu.unwrap_or_default();
        Ok(MemoryStats {
            host_tensor_bytes: m.host_tensor_bytes as f64,
            pending_steps: m.pending_steps as f64,
            device_live_bytes: g.live_bytes as f64,
            device_live_buffers: g.live_buffers as f64,
            pool_reserved_bytes: g.pool_reserved as f64,
            pool_used_bytes: g.pool_used as f64,
            device_free_bytes: g.device_free as f64,
            pooled: g.pooled,
        })
    }

    /// Drops this handle (tensors keep their device alive).
    #[napi]
    pub fn dispose(&mut self) {
        self.inner = None;
    }

    /// A tensor from f32 values rounded to `dtype` (bf16, fp16 or fp32).
    #[napi]
    pub fn tensor_from_f32(&self, data: &[f32], shape: Vec<i64>, dtype: String) -> Result<Tensor> {
        let d = self.get()?;
        let dt = parse_dtype(&dtype)?;
        let shape = dims(&shape)?;
        let t = core(|| mla_core::Tensor::from_f32(d, data, &shape, dt))?;
        Ok(Tensor::owned(t))
    }

    /// A 16-bit float tensor from raw bf16 / fp16 bits.
    #[napi]
    pub fn tensor_from_bits(&self, data: &[u16], shape: Vec<i64>, dtype: String) -> Result<Tensor> {
        let d = self.get()?;
        let dt = parse_dtype(&dtype)?;
        let shape = dims(&shape)?;
        let t = core(|| mla_core::Tensor::from_half_bits(d, data, &shape, dt))?;
        Ok(Tensor::owned(t))
    }

    /// An int32 tensor.
    #[napi]
    pub fn tensor_from_i32(&self, data: &[i32], shape: Vec<i64>) -> Result<Tensor> {
        let d = self.get()?;
        let shape = dims(&shape)?;
        let t = core(|| mla_core::Tensor::from_i32(d, data, &shape))?;
        Ok(Tensor::owned(t))
    }

    /// A zero-filled tensor.
    #[napi]
    pub fn zeros(&self, shape: Vec<i64>, dtype: String) -> Result<Tensor> {
        let d = self.get()?;
        let dt = parse_dtype(&dtype)?;
        let shape = dims(&shape)?;
        let t = core(|| mla_core::Tensor::zeros(d, &shape, dt))?;
        Ok(Tensor::owned(t))
    }

    /// Scheduling metadata for `cache_seqlens` (a [b] int32 tensor on this device):
    /// `mla_core::plan_with(seqlens, s_q * h_q / h_kv, h_kv, { batch_invariant })`.
    #[napi]
    pub fn plan(&self, cache_seqlens: &Tensor, s_q: i64, h_q: i64, h_kv: i64, batch_invariant: Option<bool>) -> Result<Plan> {
        let d = self.get()?.clone();
        for (name, v) in [("s_q", s_q), ("h_q", h_q), ("h_kv", h_kv)] {
            core(|| mla_core::validate::int_at_least(name, v, 1))?;
        }
        let src = cache_seqlens.src()?;
        src.with(|t| {
            if !t.device().same(&d) {
                return Err(err(ErrorCode::DeviceMismatch, format!("cache_seqlens: expected a tensor on {d:?} (the plan's device), got {:?}", t.device())));
            }
            // s_q * h_q must fit a u32 (the plan's `rows` getter).
            let rows = core(|| mla_core::validate::plan_rows(s_q, h_q, h_kv))?;
            let popts = mla_core::PlanOptions { batch_invariant: batch_invariant.unwrap_or(false), chunks: None };
            core(|| mla_core::plan_with(t, rows, h_kv as usize, &popts))
        })
        .map(Plan::wrap)
    }
}

/// Memory facts of a device (bytes as numbers).
#[napi(object)]
pub struct MemoryStats {
    /// Host bytes held by CPU-backend tensors, process-wide.
    pub host_tensor_bytes: f64,
    /// CUDA: steps enqueued and not yet looked at.
    pub pending_steps: f64,
    /// CUDA: bytes and count of live device buffers of this library.
    pub device_live_bytes: f64,
    pub device_live_buffers: f64,
    /// CUDA: bytes the memory pool holds from the driver, and of those in use.
    pub pool_reserved_bytes: f64,
    pub pool_used_bytes: f64,
    /// CUDA: free device memory.
    pub device_free_bytes: f64,
    /// CUDA: whether allocations come from the stream-ordered memory pool.
    pub pooled: bool,
}

fn step_id(step: i64) -> Result<u64> {
    core(|| mla_core::validate::step_id(step))
}

/// `Device.synchronize()` / `waitStep()` on the libuv thread pool.
pub type SyncTask = CoreTask<(), ()>;

fn sync_task(device: mla_core::Device, step: Option<u64>) -> AsyncTask<SyncTask> {
    CoreTask::new(
        move || {
            mla_core::trace::mark("pool:start");
            core(|| match step {
                Some(id) => device.wait_step(id),
                None => device.synchronize(),
            })
        },
        |()| (),
    )
}
