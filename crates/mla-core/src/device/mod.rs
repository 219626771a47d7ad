//! Where work runs: the CPU backend or one CUDA device.

use std::borrow::Cow;
use std::sync::Arc;

pub(crate) mod info;

use crate::error::{MlaError, Result};
use crate::gpu::{self, GpuDevice, PoolStats};

pub use crate::gpu::path::KernelPath;
pub use crate::gpu::StepId;
pub use info::{DeviceInfo, DeviceOptions, GpuDeviceStatus, GpuStatus, MIN_DRIVER_CUDA_VERSION};

/// See [`Device::memory_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes of host memory held by tensors of the CPU backend (all of them, process-wide).
    pub host_tensor_bytes: u64,
    /// CUDA: steps enqueued whose completion the log has not looked at yet.
    pub pending_steps: u64,
    /// CUDA: the device's allocations and pool.
    pub gpu: Option<PoolStats>,
}

#[derive(Clone)]
pub enum Device {
    /// The multi-threaded CPU backend (host memory).
    Cpu,
    /// One CUDA device (compute capability 8.0 or newer; see [`KernelPath`]).
    Cuda(Arc<GpuDevice>),
}

impl Device {
    pub fn cpu() -> Device {
        Device::Cpu
    }

    /// Opens CUDA device `ordinal`, on the kernel path its compute capability gives (Hopper
    /// on 9.0, the portable kernels on 8.x, 10.x, 12.x; `MLA_FORCE_PORTABLE=1` forces the
    /// portable ones). Fails with `ERR_GPU_UNAVAILABLE` (no driver, no such device,
    /// compute capability below 8.0), `ERR_DRIVER_TOO_OLD` (a driver older than CUDA 12.0,
    /// or older than the kernel compiler where the PTX must be JIT-compiled) or
    /// `ERR_KERNELS_UNAVAILABLE` (built without a CUDA compiler, or without kernels for this
    /// device): never falls back to the CPU silently.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device::Cuda(GpuDevice::open(ordinal)?))
    }

    /// [`Device::cuda`] with options, e.g. the portable kernels on a Hopper card:
    ///
    /// ```no_run
    /// # use mla_core::{Device, DeviceOptions};
    /// let dev = Device::cuda_with(0, DeviceOptions { force_portable: true, ..Default::default() })?;
    /// # Ok::<(), mla_core::MlaError>(())
    /// ```
    pub fn cuda_with(ordinal: usize, opts: DeviceOptions) -> Result<Device> {
        Ok(Device::Cuda(GpuDevice::open_with(ordinal, &opts)?))
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
                kernel_path: None,
                multiprocessors: rayon::current_num_threads(),
                total_memory: 0,
            },
            Device::Cuda(g) => g.info().clone(),
        }
    }

    /// Waits for all queued work and reports the first step that failed on the device and
    /// was not reported yet, as a typed error naming the step (`step 7 (decode): block_table:
    /// ...`); the other failed steps are named in its message and dropped. See
    /// [`Device::step`] for the model.
    ///
    /// ```
    /// # use mla_core::Device;
    /// Device::cpu().synchronize()?; // nothing failed
    /// # Ok::<(), mla_core::MlaError>(())
    /// ```
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => cpu_steps::report(),
            Device::Cuda(g) => g.synchronize(),
        }
    }

    /// Waits until step `id` has completed and reports its own error, if it failed. Failures
    /// of other steps stay for the next synchronising call.
    pub fn wait_step(&self, id: StepId) -> Result<()> {
        match self {
            Device::Cpu => cpu_steps::wait(id),
            Device::Cuda(g) => g.wait_step(id),
        }
    }

    /// Whether step `id` has completed, without waiting: `Ok(true)` once it has (reporting
    /// its own error, as [`Device::wait_step`] does), `Ok(false)` while it runs. Meant for
    /// tracked steps ([`Device::step_tracked`]: one event query on CUDA); an untracked step
    /// on CUDA is waited for. The CPU backend's steps complete while they are enqueued.
    pub fn poll_step(&self, id: StepId) -> Result<bool> {
        match self {
            Device::Cpu => cpu_steps::wait(id).map(|()| true),
            Device::Cuda(g) => g.poll_step(id),
        }
    }

    /// Reports, without waiting, the first failed step among those whose flags were already
    /// read (on CUDA: tracked steps that completed, and earlier harvests; see
    /// `GpuDevice::step`). Reading a tensor to the host reports like a synchronise.
    pub fn check_steps(&self) -> Result<()> {
        match self {
            Device::Cpu => cpu_steps::report(),
            Device::Cuda(g) => g.check_steps(),
        }
    }

    /// Runs `enqueue` as one step of this device and returns its id at once (on CUDA without
    /// waiting for the device; the CPU backend computes while enqueueing).
    ///
    /// # The step model
    ///
    /// Everything that launches work (decode, plan, replan, a cache append, a graph replay)
    /// is a step with an id (1, 2, 3, ... per device) and a label. Checks of shapes, dtypes
    /// and devices run on the host before anything is queued and fail the call itself. Checks
    /// of tensor *contents* (a block index, a length, a plan made for other lengths) run where
    /// the data lives: on CUDA in the kernels, which OR error bits into the step's own flag.
    /// A call that returns once its work is queued reports such an error later, typed and
    /// naming the step: [`Device::synchronize`], [`Device::wait_step`] for that step, or
    /// reading any tensor of the device to the host. A failed step's outputs are not valid;
    /// later steps are unaffected (each has its own flag). The CPU backend keeps the same
    /// model for the enqueueing calls (`decode::enqueue_into`, `KvCache::append_batch`, graph
    /// replay): their content errors are recorded for the step and reported the same way.
    pub fn step<T>(&self, label: impl Into<Cow<'static, str>>, enqueue: impl FnOnce() -> Result<T>) -> Result<(StepId, T)> {
        match self {
            Device::Cpu => cpu_steps::step(enqueue),
            Device::Cuda(g) => g.step(label, &g.stream().clone(), enqueue),
        }
    }

    /// [`Device::step`] for a step that will be waited on by itself ([`Device::wait_step`]
    /// or [`Device::poll_step`]): on CUDA an event is queued after it, so that the wait
    /// covers this step only and needs no further round trip.
    pub fn step_tracked<T>(&self, label: impl Into<Cow<'static, str>>, enqueue: impl FnOnce() -> Result<T>) -> Result<(StepId, T)> {
        match self {
            Device::Cpu => cpu_steps::step(enqueue),
            Device::Cuda(g) => g.step_tracked(label, &g.stream().clone(), enqueue),
        }
    }

    /// Runs `enqueue` (which queues work, e.g. `decode`) as one step, waits for it and
    /// reports the errors its kernels flagged (and only those).
    pub fn run_step<T>(&self, enqueue: impl FnOnce() -> Result<T>) -> Result<T> {
        match self {
            Device::Cpu => {
                let (id, v) = cpu_steps::step(enqueue)?;
                cpu_steps::wait(id).map(|_| v)
            }
            Device::Cuda(g) => g.run_step(enqueue),
        }
    }

    /// The step this thread is enqueueing on this device, if any.
    pub fn current_step(&self) -> Option<StepId> {
        match self {
            Device::Cpu => cpu_steps::current(),
            Device::Cuda(g) => g.current_step(),
        }
    }

    /// CPU backend: records `e` as the failure of step `id` (reported like a device-side
    /// error). No effect on CUDA, where the kernels flag their own errors.
    pub(crate) fn fail_step(&self, id: StepId, label: Cow<'static, str>, e: MlaError) {
        if let Device::Cpu = self {
            cpu_steps::fail(id, label, e)
        }
    }

    /// Memory and step-log facts, e.g. for a soak test: host bytes held by CPU tensors,
    /// the device's pool, steps not yet looked at.
    pub fn memory_stats(&self) -> MemoryStats {
        match self {
            Device::Cpu => MemoryStats { host_tensor_bytes: crate::host::live_host_bytes() as u64, pending_steps: 0, gpu: None },
            Device::Cuda(g) => {
                MemoryStats { host_tensor_bytes: crate::host::live_host_bytes() as u64, pending_steps: g.pending_steps() as u64, gpu: Some(g.memory_stats()) }
            }
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

pub fn gpu_status() -> GpuStatus {
    gpu::status()
}

/// The step log of the CPU backend (one per process, like the device itself). A CPU step
/// completes while it is enqueued; failures recorded for it wait here until reported.
mod cpu_steps {
    use std::borrow::Cow;
    use std::cell::Cell;
    use std::sync::Mutex;

    use super::StepId;
    use crate::error::{ErrorCode, MlaError, Result};

    struct Log {
        next_id: StepId,
        failed: Vec<(StepId, Cow<'static, str>, MlaError)>,
    }

    static LOG: Mutex<Log> = Mutex::new(Log { next_id: 1, failed: Vec::new() });

    thread_local! {
        static CURRENT: Cell<Option<StepId>> = const { Cell::new(None) };
    }

    fn lock() -> std::sync::MutexGuard<'static, Log> {
        LOG.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn current() -> Option<StepId> {
        CURRENT.with(|c| c.get())
    }

    pub fn step<T>(enqueue: impl FnOnce() -> Result<T>) -> Result<(StepId, T)> {
        if let Some(id) = current() {
            return enqueue().map(|v| (id, v));
        }
        let id = {
            let mut l = lock();
            l.next_id += 1;
            l.next_id - 1
        };
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(None));
            }
        }
        CURRENT.with(|c| c.set(Some(id)));
        let _reset = Reset;
        enqueue().map(|v| (id, v))
    }

    pub fn fail(id: StepId, label: Cow<'static, str>, e: MlaError) {
        let mut l = lock();
        // One failure per step (a step of several decodes reports its first).
        if !l.failed.iter().any(|f| f.0 == id) {
            l.failed.push((id, label, e));
        }
    }

    fn named(id: StepId, label: &str, mut e: MlaError) -> MlaError {
        e.message = format!("step {id} ({label}): {}", e.message);
        e
    }

    pub fn wait(id: StepId) -> Result<()> {
        let mut l = lock();
        if id == 0 || id >= l.next_id {
            return Err(MlaError::arg(ErrorCode::InvalidArgument, "step", format!("the id of a step enqueued on this device (1..{})", l.next_id), id));
        }
        match l.failed.iter().position(|f| f.0 == id) {
            Some(i) => {
                let (id, label, e) = l.failed.remove(i);
                Err(named(id, &label, e))
            }
            None => Ok(()),
        }
    }

    pub fn report() -> Result<()> {
        if current().is_some() {
            return Ok(());
        }
        let mut l = lock();
        if l.failed.is_empty() {
            return Ok(());
        }
        l.failed.sort_by_key(|f| f.0);
        let (id, label, e) = l.failed.remove(0);
        let others: Vec<String> = l.failed.drain(..).map(|f| f.0.to_string()).collect();
        let mut e = named(id, &label, e);
        if !others.is_empty() {
            e.message.push_str(&format!(" [later failed steps, reported with this one: {}]", others.join(", ")));
        }
        Err(e)
    }
}
