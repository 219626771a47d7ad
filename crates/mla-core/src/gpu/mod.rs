//! The CUDA runtime: device discovery, memory, streams and the embedded kernels (sm_90a for
//! Hopper, the portable path's cubins and compute_80 PTX for every other GPU from sm_80 on).
//!
//! libcuda is loaded at run time (cudarc's dynamic loading), and only after checking that
//! it exists, so a process on a machine without a driver gets `ERR_GPU_UNAVAILABLE`
//! instead of a crash.

mod buffer;
pub mod graph;
pub mod kernels;
pub mod launch;
pub mod ops;
pub mod params;
pub mod path;
pub mod tma;
pub mod tma_cache;
pub mod util;

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};

pub use buffer::{DeviceBuffer, PoolStats, StagePart};
pub(crate) use buffer::{MemCtx, PinnedBuf};

use crate::device::info::{DeviceInfo, DeviceOptions, GpuDeviceStatus, GpuStatus, MIN_DRIVER_CUDA_VERSION};
use crate::error::{ErrorCode, MlaError, Result};
use path::{KernelPath, PathChoice, Request};

struct Driver {
    /// The CUDA version the driver supports, as (major, minor).
    version: Option<(i32, i32)>,
    /// Why the driver cannot be used at all.
    problem: Option<MlaError>,
}

/// The driver probed once per process: present, its CUDA version, initialised.
fn driver() -> &'static Driver {
    static DRIVER: OnceLock<Driver> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let unavailable = |m: String| Driver { version: None, problem: Some(MlaError::new(ErrorCode::GpuUnavailable, m)) };
        // SAFETY: only probes dlopen; no driver symbol is touched when absent.
        if !unsafe { sys::is_culib_present() } {
            return unavailable("the CUDA driver library (libcuda.so) was not found".into());
        }
        // cuDriverGetVersion needs no cuInit: read it first, so that an old driver is named
        // as such even where initialising it fails.
        let version = std::panic::catch_unwind(|| {
            let mut v = 0;
            // SAFETY: writes one int.
            let r = unsafe { sys::cuDriverGetVersion(&mut v) };
            (r == sys::CUresult::CUDA_SUCCESS).then_some((v / 1000, (v % 1000) / 10))
        })
        .ok()
        .flatten();
        if let Some(v) = version {
            if v < MIN_DRIVER_CUDA_VERSION {
                return Driver { version, problem: Some(driver_too_old(v)) };
            }
        }
        match std::panic::catch_unwind(result::init) {
            Ok(Ok(())) => Driver { version, problem: None },
            Ok(Err(e)) => Driver { version, problem: Some(MlaError::new(ErrorCode::GpuUnavailable, format!("cuInit failed: {e:?}"))) },
            Err(_) => unavailable("the CUDA driver library could not be loaded".into()),
        }
    })
}

fn driver_too_old(v: (i32, i32)) -> MlaError {
    let (maj, min) = MIN_DRIVER_CUDA_VERSION;
    MlaError::arg(
        ErrorCode::DriverTooOld,
        "CUDA driver",
        format!("a driver for CUDA {maj}.{min} or newer (Linux R525.60.13 or later: the kernels are CUDA 12 cubins)"),
        format!("a driver for CUDA {}.{}; update the NVIDIA driver", v.0, v.1),
    )
}

/// The CUDA version the installed driver supports (cuDriverGetVersion), e.g. (12, 8);
/// `None` without a driver.
pub fn driver_version() -> Option<(i32, i32)> {
    driver().version
}

fn device_count() -> Result<usize> {
    if let Some(p) = &driver().problem {
        return Err(p.clone());
    }
    Ok(result::device::get_count()? as usize)
}

/// Whether the GPU path is usable, and why not.
pub fn status() -> GpuStatus {
    let kernels_built = mla_kernels::available();
    let (count, mut reason) = match device_count() {
        Ok(0) => (0, Some("no CUDA device is visible".to_string())),
        Ok(n) => (n, None),
        Err(e) => (0, Some(e.message)),
    };
    if reason.is_none() && !kernels_built {
        reason = Some(format!("this build has no GPU kernels: {}", mla_kernels::UNAVAILABLE_REASON));
    }
    // Per device, the path Device::cuda(ordinal) would take (MLA_FORCE_PORTABLE included),
    // from its attributes alone: no context is created.
    let req = Request::from_env_value(std::env::var("MLA_FORCE_PORTABLE").ok().as_deref());
    let devices: Vec<GpuDeviceStatus> = (0..count).map(|i| device_status(i, req.clone())).collect();
    if reason.is_none() && !devices.iter().any(|d| d.kernel_path.is_some()) {
        reason = devices.first().and_then(|d| d.reason.clone());
    }
    GpuStatus {
        available: reason.is_none(),
        device_count: count,
        kernels_built,
        kernels_compiler: mla_kernels::COMPILER,
        kernel_targets: mla_kernels::targets(),
        driver_version: driver_version(),
        devices,
        reason,
    }
}

/// A device's name and compute capability, without a context.
fn probe_device(ordinal: usize) -> Result<(String, (i32, i32))> {
    let dev = result::device::get(ordinal as i32)?;
    // SAFETY: reads two ints of a valid device handle.
    let attr = |a| unsafe { result::device::get_attribute(dev, a) };
    let cc = (
        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    Ok((result::device::get_name(dev)?, cc))
}

fn device_status(ordinal: usize, req: Result<Request>) -> GpuDeviceStatus {
    let (name, cc, choice) = match probe_device(ordinal) {
        Ok((name, cc)) => (name, cc, req.and_then(|r| path::select_for_build(cc, r, driver_version()))),
        Err(e) => (String::new(), (0, 0), Err(e)),
    };
    GpuDeviceStatus {
        ordinal,
        name,
        compute_capability: cc,
        kernel_path: choice.as_ref().ok().map(|c| c.path),
        kernel_target: choice.as_ref().ok().map(|c| c.target),
        reason: choice.err().map(|e| format!("{}: {}", e.code.as_str(), e.message)),
    }
}

/// The request of `opts`: its own path or force, else MLA_FORCE_PORTABLE.
fn request_of(opts: &DeviceOptions) -> Result<Request> {
    if let Some(p) = opts.kernel_path {
        return Ok(Request::Exact(p));
    }
    if opts.force_portable {
        return Ok(Request::Portable);
    }
    Request::from_env_value(std::env::var("MLA_FORCE_PORTABLE").ok().as_deref())
}

/// One opened CUDA device: its primary context, a default stream, the loaded kernels, its
/// memory (pool, staging ring, events) and the log of enqueued steps with their error flags.
pub struct GpuDevice {
    ordinal: usize,
    /// The kernels this device runs, and the target of the modules it loaded.
    choice: PathChoice,
    /// Largest row tile of the portable decode here: 32 where the loaded build has it and
    /// the device lets a block have its shared memory, else 16.
    portable_max_tile: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    kernels: kernels::Kernels,
    mem: Arc<MemCtx>,
    steps: StepLog,
    /// How many pairs of the warp-specialised decode run at once (`ops::ws_cluster`), asked once.
    pair_clusters: std::sync::OnceLock<u32>,
}

impl Drop for GpuDevice {
    fn drop(&mut self) {
        // The modules are unloaded next: no kernel of them may still be queued.
        let _ = self.ctx.bind_to_thread();
        let _ = self.ctx.synchronize();
    }
}

/// One `GpuDevice` per ordinal in the process, so that every handle to a GPU shares its
/// stream (ordering) and its step log.
static OPEN: Mutex<Vec<(usize, std::sync::Weak<GpuDevice>)>> = Mutex::new(Vec::new());

impl GpuDevice {
    /// The device `ordinal`, opened on first use and shared while any handle lives.
    pub fn open(ordinal: usize) -> Result<Arc<GpuDevice>> {
        GpuDevice::open_with(ordinal, &DeviceOptions::default())
    }

    /// [`GpuDevice::open`] with options (the kernel path). A device runs one path per
    /// process: asking for another one while it is open is an error; a request without
    /// any (no option, MLA_FORCE_PORTABLE unset) shares the open device whatever its path.
    pub fn open_with(ordinal: usize, opts: &DeviceOptions) -> Result<Arc<GpuDevice>> {
        let req = request_of(opts)?;
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(g) = open.iter().find(|(o, _)| *o == ordinal).and_then(|(_, w)| w.upgrade()) {
            if req != Request::Auto {
                let want = path::select_for_build(g.info.compute_capability, req, driver_version())?;
                if want.path != g.choice.path {
                    return Err(MlaError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "device cuda:{ordinal} is open with kernel path '{}' in this process; '{}' was asked for (a device runs one path: dispose of every handle and tensor of it first)",
                            g.choice.path, want.path
                        ),
                    ));
                }
            }
            return Ok(g);
        }
        let g = GpuDevice::create(ordinal, req)?;
        open.push((ordinal, Arc::downgrade(&g)));
        Ok(g)
    }

    fn create(ordinal: usize, req: Request) -> Result<Arc<GpuDevice>> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(MlaError::arg(ErrorCode::GpuUnavailable, "device", format!("an ordinal below {count}"), ordinal));
        }
        if !mla_kernels::available() {
            return Err(MlaError::new(ErrorCode::KernelsUnavailable, format!("this build has no GPU kernels: {}", mla_kernels::UNAVAILABLE_REASON)));
        }
        // The path first, from the device's attributes: a device that cannot run any is
        // refused before a context exists.
        let (_, cc) = probe_device(ordinal)?;
        let choice = path::select_for_build(cc, req, driver_version())?;
        let ctx = CudaContext::new(ordinal)?;
        // Buffers here are raw allocations ordered on our own streams.
        unsafe { ctx.disable_event_tracking() };
        let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let info = DeviceInfo {
            kind: "cuda",
            name: ctx.name()?,
            ordinal,
            compute_capability: cc,
            kernel_path: Some(choice.path),
            multiprocessors: sms,
            total_memory: ctx.total_mem()? as u64,
        };
        let stream = ctx.new_stream()?;
        let kernels = kernels::Kernels::load(&ctx, choice.target, choice.path.folders())?;
        let portable_max_tile = match choice.path {
            KernelPath::Hopper => 0,
            _ => portable_tile(&ctx, &kernels)?,
        };
        let mem = MemCtx::new(&ctx, &stream, ordinal)?;
        let steps = StepLog::new(&mem)?;
        stream.synchronize()?;
        Ok(Arc::new(GpuDevice { ordinal, choice, portable_max_tile, ctx, stream, info, kernels, mem, steps, pair_clusters: Default::default() }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The kernels this device runs.
    pub fn kernel_path(&self) -> KernelPath {
        self.choice.path
    }
    /// The target of the loaded modules (`sm_90a`, `sm_86`, `compute_80`).
    pub fn kernel_target(&self) -> &'static str {
        self.choice.target
    }
    /// Largest row tile of the portable decode on this device (16 or 32; 0 on Hopper).
    pub fn portable_max_tile(&self) -> usize {
        self.portable_max_tile
    }
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream that memory operations and, by default, decode steps are ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// A new stream on this device, for callers that overlap independent work.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        Ok(self.ctx.new_stream()?)
    }
    /// The device's answer to `ask` (the occupancy of the decode's 2-CTA clusters: the same
    /// for both entries, whose resources are equal), asked on first use. A device that cannot
    /// answer (an error from the query) counts as running none: the decode then launches
    /// without clusters instead of failing.
    pub(crate) fn max_pair_clusters(&self, ask: impl FnOnce() -> Result<u32>) -> u32 {
        *self.pair_clusters.get_or_init(|| ask().unwrap_or(0))
    }
    pub fn kernels(&self) -> &kernels::Kernels {
        &self.kernels
    }
    pub(crate) fn mem(&self) -> &Arc<MemCtx> {
        &self.mem
    }
    pub fn free_memory(&self) -> Result<u64> {
        self.ctx.bind_to_thread()?;
        Ok(result::mem_get_info()?.0 as u64)
    }

    /// Device address of the error flag the kernels launched now must OR `MLA_ERR_*` bits
    /// into: the current step's own flag when called inside a step on this thread (see
    /// [`GpuDevice::step`]), else a flag for work outside any step, which
    /// [`GpuDevice::synchronize`] reports.
    pub fn error_flag_ptr(&self) -> u64 {
        match current_step(self) {
            Some(c) => c.flag,
            None => {
                self.steps.ambient_used.store(true, Ordering::Release);
                self.steps.ambient_ptr()
            }
        }
    }

    pub fn alloc_zeroed(&self, nbytes: usize) -> Result<DeviceBuffer> {
        let b = DeviceBuffer::alloc(&self.mem, nbytes)?;
        b.fill(0)?;
        Ok(b)
    }

    /// An allocation whose contents are left as they are (no memset queued).
    pub fn alloc_uninit(&self, nbytes: usize) -> Result<DeviceBuffer> {
        DeviceBuffer::alloc(&self.mem, nbytes)
    }

    /// A new buffer holding `bytes` (the copy is queued; `bytes` is not borrowed after the call).
    pub fn upload(&self, bytes: &[u8]) -> Result<DeviceBuffer> {
        let mut b = DeviceBuffer::alloc(&self.mem, bytes.len())?;
        b.write(0, bytes)?;
        Ok(b)
    }

    /// Notes that work goes to `stream` and, when it is not the device's stream, orders it
    /// after everything queued on the device's stream so far (allocations, uploads). Returns
    /// whether `stream` is capturing a graph: then the wait is left out (the caller orders
    /// its capture stream itself) and no step bookkeeping may be queued on it. The device's
    /// own stream is never captured by this library; do not capture it yourself.
    pub(crate) fn prepare_stream(&self, stream: &Arc<CudaStream>) -> Result<bool> {
        if !self.mem.note_stream(stream) {
            return Ok(false);
        }
        let capturing = stream.capture_status()? != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        if !capturing {
            let ev = self.mem.event()?;
            ev.record(&self.stream)?;
            stream.wait(&ev)?;
            self.mem.recycle(ev);
        }
        Ok(capturing)
    }

    /// Runs `enqueue` (which queues kernels on `stream`) as one step of this device and
    /// returns its id, without waiting for the device and without queueing anything after
    /// the step's own work.
    ///
    /// Every step has an error flag of its own (a slot of the device's log): kernels
    /// launched by `enqueue` on this thread OR their `MLA_ERR_*` bits into it
    /// ([`GpuDevice::error_flag_ptr`]; the slots are page-locked host memory mapped into
    /// the device, see `Flags`). A synchronising call ([`GpuDevice::synchronize`],
    /// [`GpuDevice::wait_step`], reading a tensor) waits for the work queued so far, reads
    /// the slots of the steps it covers (a "harvest"; with `MLA_STEP_FLAGS=device` it first
    /// queues a copy of all the slots into pinned memory), and reports the first failed step
    /// as a typed error naming the step (`step 12 (decode): block_table: ...`). A failed step's slot is cleared before it is reused, so a bad step
    /// never marks a later one.
    ///
    /// A step inside a step (on the same thread) is part of the outer step. When `enqueue`
    /// fails, its error is returned (and whatever it launched is still tracked, so that
    /// nothing leaks into a later step). Steps on another stream than the device's are
    /// tracked as by [`GpuDevice::step_tracked`].
    pub fn step<T>(&self, label: impl Into<Cow<'static, str>>, stream: &Arc<CudaStream>, enqueue: impl FnOnce() -> Result<T>) -> Result<(StepId, T)> {
        self.step_inner(label.into(), stream, None, false, enqueue)
    }

    /// [`GpuDevice::step`] for a step that will be waited on by itself (a decode's promise,
    /// `decodeSync`, `run_step`): an event is queued after it (with `MLA_STEP_FLAGS=device`
    /// also a 4-byte copy of its flag into pinned memory), so that [`GpuDevice::wait_step`]
    /// and [`GpuDevice::poll_step`] look at this step only, with no further round trip.
    pub fn step_tracked<T>(&self, label: impl Into<Cow<'static, str>>, stream: &Arc<CudaStream>, enqueue: impl FnOnce() -> Result<T>) -> Result<(StepId, T)> {
        self.step_inner(label.into(), stream, None, true, enqueue)
    }

    /// A step whose kernels were given `flag` (a device int) at capture time instead of a
    /// slot of the log (a CUDA graph's own flag): after its work, `flag` is copied into the
    /// step's slot and cleared, in stream order.
    pub(crate) fn step_with_flag<T>(
        &self,
        label: Cow<'static, str>,
        stream: &Arc<CudaStream>,
        flag: u64,
        tracked: bool,
        enqueue: impl FnOnce() -> Result<T>,
    ) -> Result<(StepId, T)> {
        self.step_inner(label, stream, Some(flag), tracked, enqueue)
    }

    fn step_inner<T>(
        &self,
        label: Cow<'static, str>,
        stream: &Arc<CudaStream>,
        shared: Option<u64>,
        tracked: bool,
        enqueue: impl FnOnce() -> Result<T>,
    ) -> Result<(StepId, T)> {
        if let Some(c) = current_step(self) {
            return enqueue().map(|v| (c.id, v));
        }
        let tracked = tracked || stream.cu_stream() != self.stream.cu_stream();
        let mut st = loop {
            let st = self.steps.lock();
            if !st.free.is_empty() {
                break st;
            }
            // Every slot holds a step not looked at yet: harvest (waits for the queued work).
            drop(st);
            self.harvest(Wait::Harvest)?;
        };
        let slot = st.free.pop().unwrap();
        let id = st.next_id;
        st.next_id += 1;
        let flag = self.steps.slot_ptr(slot);
        let r = {
            let _in = StepGuard::enter(CurrentStep { device: key(self), flag, id });
            enqueue()
        };
        crate::trace::mark("step:enqueued");
        let event = match self.steps.finish(&self.mem, stream, slot, shared, tracked) {
            Ok(e) => e,
            Err(e) => {
                // Nothing tracks the step: wait for it here and clear its flag now.
                let _ = self.ctx.synchronize();
                let _ = self.steps.clear_slot_sync(&self.stream, slot as usize);
                st.free.push(slot);
                return Err(e);
            }
        };
        let p = Pending { id, label, slot, event, known: r.is_err() };
        if p.event.is_some() {
            st.tracked.push_back(p);
        } else {
            st.pending.push_back(p);
        }
        crate::trace::mark("step:finished");
        r.map(|v| (id, v))
    }

    /// The id of the step this thread is enqueueing on this device, if any.
    pub fn current_step(&self) -> Option<StepId> {
        current_step(self).map(|c| c.id)
    }

    /// Waits until step `id` has completed and reports its own error (a failed step is
    /// reported once: here, or by the next synchronising call when nobody waited for it).
    /// Errors of other steps stay for the next [`GpuDevice::synchronize`]. For a step made
    /// by [`GpuDevice::step`] (not tracked) this waits for everything queued on the device's
    /// stream up to this call.
    pub fn wait_step(&self, id: StepId) -> Result<()> {
        if current_step(self).is_some() {
            return Err(MlaError::new(ErrorCode::InvalidArgument, "wait_step: called while enqueueing a step on this thread"));
        }
        let ev = {
            let st = self.steps.lock();
            if id == 0 || id >= st.next_id {
                return Err(MlaError::arg(ErrorCode::InvalidArgument, "step", format!("the id of a step enqueued on this device (1..{})", st.next_id), id));
            }
            st.find(id).map(|p| p.event.clone())
        };
        match ev {
            Some(Some(ev)) => {
                ev.synchronize()?;
                crate::trace::mark("wait:complete");
                // Our clone goes first, so that resolve_tracked can give the event back to
                // the pool (else it is destroyed, and the next step creates one).
                drop(ev);
                let mut st = self.steps.lock();
                self.steps.resolve_tracked(&mut st, &self.stream)?;
            }
            Some(None) => self.harvest(Wait::Harvest)?,
            None => {}
        }
        let mut st = self.steps.lock();
        match st.failed.iter().position(|f| f.id == id) {
            Some(i) => Err(st.failed.remove(i).into_error(&[])),
            None => Ok(()),
        }
    }

    /// Whether step `id` has completed, without waiting: `Ok(true)` once it has, reporting
    /// its own error as [`GpuDevice::wait_step`] does (once), `Ok(false)` while its work
    /// runs. A tracked step ([`GpuDevice::step_tracked`]: a decode's promise, decodeSync)
    /// costs one event query; for an untracked step this waits as `wait_step` does (it has
    /// no completion of its own to look at).
    pub fn poll_step(&self, id: StepId) -> Result<bool> {
        if current_step(self).is_some() {
            return Err(MlaError::new(ErrorCode::InvalidArgument, "poll_step: called while enqueueing a step on this thread"));
        }
        {
            let mut st = self.steps.lock();
            if id == 0 || id >= st.next_id {
                return Err(MlaError::arg(ErrorCode::InvalidArgument, "step", format!("the id of a step enqueued on this device (1..{})", st.next_id), id));
            }
            match st.find(id).map(|p| p.event.clone()) {
                Some(Some(ev)) => {
                    let done = ev.try_is_complete()?;
                    drop(ev); // as in wait_step: the event goes back to the pool
                    if !done {
                        return Ok(false);
                    }
                    crate::trace::mark("poll:complete");
                    self.steps.resolve_tracked(&mut st, &self.stream)?;
                }
                Some(None) => {
                    drop(st);
                    return self.wait_step(id).map(|()| true);
                }
                None => {}
            }
            match st.failed.iter().position(|f| f.id == id) {
                Some(i) => Err(st.failed.remove(i).into_error(&[])),
                None => Ok(true),
            }
        }
    }

    /// Waits for every stream of this context, then reports the first step that failed and
    /// was not reported yet (its flag bits as a typed error naming the step); the others that
    /// failed with it are named in the message and dropped. Work launched outside any step
    /// is reported as step 0.
    pub fn synchronize(&self) -> Result<()> {
        if current_step(self).is_some() {
            return Err(MlaError::new(ErrorCode::InvalidArgument, "synchronize: called while enqueueing a step on this thread"));
        }
        self.harvest(Wait::Device)?;
        self.mem.flush_reuse();
        report(&mut self.steps.lock())
    }

    /// Copies `buf` to the host (a synchronising call: it reports the first failed step
    /// that has completed, see [`GpuDevice::step`]). Inside a step on this thread it only
    /// copies.
    pub fn download_checked(&self, buf: &DeviceBuffer) -> Result<Vec<u8>> {
        if current_step(self).is_some() {
            return buf.download();
        }
        let mut bytes = None;
        self.harvest(Wait::Then(&mut || {
            bytes = Some(buf.download()?);
            Ok(())
        }))?;
        report(&mut self.steps.lock())?;
        Ok(bytes.expect("downloaded"))
    }

    /// Reports (without waiting) the first failed step among those whose flags were read.
    pub fn check_steps(&self) -> Result<()> {
        if current_step(self).is_some() {
            return Ok(());
        }
        let mut st = self.steps.lock();
        self.steps.resolve_tracked(&mut st, &self.stream)?;
        report(&mut st)
    }

    /// Queues a harvest of every step slot behind the work queued so far, waits as `wait`
    /// says, then looks at the flags of the steps it covers (and of tracked steps that
    /// completed). Harvests are serialised; the step log is not locked while waiting.
    fn harvest(&self, wait: Wait<'_>) -> Result<()> {
        let _one = self.steps.harvest_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (cover, event) = {
            let st = self.steps.lock();
            // No step is half enqueued while the log is locked: every step below `cover` has
            // queued its work before this point of the device's stream.
            let ev = self.steps.queue_harvest(&self.mem, &self.stream, !matches!(wait, Wait::Device))?;
            (st.next_id, ev)
        };
        match wait {
            Wait::Harvest => event.as_ref().expect("queued").synchronize()?,
            Wait::Device => {
                let epoch = self.mem.epoch();
                self.ctx.synchronize()?;
                crate::trace::mark("sync:device-idle");
                self.mem.mark_clean(epoch);
                // A device-memory log's copy, if one was queued, is done too.
            }
            Wait::Then(f) => {
                f()?;
                event.as_ref().expect("queued").synchronize()?;
            }
        }
        let mut st = self.steps.lock();
        self.steps.resolve_harvested(&mut st, &self.stream, cover)?;
        self.steps.resolve_tracked(&mut st, &self.stream)?;
        if let Some(ev) = event {
            self.mem.recycle(ev);
        }
        Ok(())
    }

    /// See [`crate::Device::run_step`].
    pub fn run_step<T>(&self, enqueue: impl FnOnce() -> Result<T>) -> Result<T> {
        if current_step(self).is_some() {
            return enqueue();
        }
        let (id, v) = self.step_tracked("step", &self.stream.clone(), enqueue)?;
        self.wait_step(id)?;
        Ok(v)
    }

    /// Steps enqueued whose flags were not looked at yet.
    pub fn pending_steps(&self) -> usize {
        let st = self.steps.lock();
        st.pending.len() + st.tracked.len()
    }

    pub fn memory_stats(&self) -> PoolStats {
        self.mem.stats()
    }

    /// Whether the step flags are mapped host memory (the default; `MLA_STEP_FLAGS=device`
    /// keeps them in device memory, copied to the host by tracked steps and harvests).
    pub fn step_flags_mapped(&self) -> bool {
        self.steps.mapped()
    }
}

/// The largest portable decode tile the loaded modules have and the device can run: a
/// block's shared memory (the opt-in limit) must hold it. 16-row tiles fit every part from
/// sm_80 on; a device where even they do not is refused, typed, at open.
fn portable_tile(ctx: &Arc<CudaContext>, kernels: &kernels::Kernels) -> Result<usize> {
    let optin = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
    use mla_kernels::entries::{MLA_DECODE_BF16_M16, MLA_DECODE_BF16_M32};
    // The tiles' shared memory as the kernels declare it (the same for both dtypes).
    let need16 = kernels.smem(MLA_DECODE_BF16_M16).unwrap_or(0) as usize;
    if optin < need16 {
        return Err(MlaError::arg(
            ErrorCode::GpuUnavailable,
            "device shared memory per block",
            format!("at least {need16} bytes (the portable decode's 16-row tile)"),
            format!("{optin} bytes"),
        ));
    }
    let m32 = kernels.has(MLA_DECODE_BF16_M32) && kernels.smem(MLA_DECODE_BF16_M32).is_some_and(|b| optin >= b as usize);
    Ok(if m32 { 32 } else { 16 })
}

/// How a harvest waits.
enum Wait<'a> {
    /// For the harvest copy itself (everything queued on the device's stream before it).
    Harvest,
    /// For every stream of the context.
    Device,
    /// Runs the closure (which waits for the device's stream, e.g. a download), then for
    /// the harvest copy.
    Then(&'a mut dyn FnMut() -> Result<()>),
}

/// Id of an enqueued step: per device, 1, 2, 3, ... (0 names work outside any step).
pub type StepId = u64;

/// Step slots of a device's log: at most this many steps are enqueued and not looked at;
/// the next one first harvests (which waits for the work queued so far).
pub const STEP_SLOTS: usize = 1024;

#[derive(Clone, Copy)]
struct CurrentStep {
    device: usize,
    flag: u64,
    id: StepId,
}

thread_local! {
    static CURRENT: Cell<Option<CurrentStep>> = const { Cell::new(None) };
}

fn key(g: &GpuDevice) -> usize {
    g as *const GpuDevice as usize
}

fn current_step(g: &GpuDevice) -> Option<CurrentStep> {
    CURRENT.with(|c| c.get()).filter(|c| c.device == key(g))
}

/// Marks this thread as enqueueing a step until dropped (also on a panic).
struct StepGuard(Option<CurrentStep>);
impl StepGuard {
    fn enter(c: CurrentStep) -> StepGuard {
        StepGuard(CURRENT.with(|x| x.replace(Some(c))))
    }
}
impl Drop for StepGuard {
    fn drop(&mut self) {
        CURRENT.with(|x| x.set(self.0));
    }
}

/// Runs `f` with kernels' error flag set to `flag` (a graph capture's own flag).
pub(crate) fn with_flag<T>(g: &GpuDevice, flag: u64, f: impl FnOnce() -> T) -> T {
    let _in = StepGuard::enter(CurrentStep { device: key(g), flag, id: 0 });
    f()
}

struct Pending {
    id: StepId,
    label: Cow<'static, str>,
    slot: u32,
    /// Tracked steps: the event after the copy of their flag into their pinned slot.
    /// Others are looked at by a harvest.
    event: Option<Arc<CudaEvent>>,
    /// Its enqueue failed and returned that error: flags are cleared, not reported.
    known: bool,
}

struct StepFailure {
    id: StepId,
    label: Cow<'static, str>,
    bits: i32,
}

impl StepFailure {
    fn into_error(self, others: &[StepId]) -> MlaError {
        let mut e = flag_error(self.bits);
        e.message = format!("step {} ({}): {}", self.id, self.label, e.message);
        if !others.is_empty() {
            let ids: Vec<String> = others.iter().map(|i| i.to_string()).collect();
            e.message.push_str(&format!(" [later failed steps, reported with this one: {}]", ids.join(", ")));
        }
        e
    }
}

/// The typed error for flag bits (the first that is set, in this order).
fn flag_error(bits: i32) -> MlaError {
    if bits & params::MLA_ERR_BLOCK_INDEX != 0 {
        return MlaError::new(
            ErrorCode::BlockIndexOutOfRange,
            "block_table: a device-resident block index that would be read (or, by a cache append, written) is \
             outside [0, num_blocks); the kernel skipped it and the outputs of this step are not valid",
        );
    }
    if bits & params::MLA_ERR_SEQLEN != 0 {
        return MlaError::new(
            ErrorCode::SeqlenOutOfRange,
            "cache_seqlens: a device-resident length is outside [0, max_blocks_per_seq * 64]; \
             the outputs of this step are not valid",
        );
    }
    MlaError::new(
        ErrorCode::InvalidArgument,
        "plan: the scheduling metadata does not fit these cache_seqlens (a plan made for other \
         lengths: call replan after the lengths change); the outputs of this step are not valid",
    )
}

/// The first failed step as an error; the rest are named in its message and dropped.
fn report(st: &mut StepState) -> Result<()> {
    if st.failed.is_empty() {
        return Ok(());
    }
    st.failed.sort_by_key(|f| f.id);
    let first = st.failed.remove(0);
    let others: Vec<StepId> = st.failed.drain(..).map(|f| f.id).collect();
    Err(first.into_error(&others))
}

struct StepState {
    next_id: StepId,
    free: Vec<u32>,
    /// Untracked steps not looked at yet, in id order (a harvest settles a prefix).
    pending: VecDeque<Pending>,
    /// Tracked steps (with an event) not looked at yet, in id order. Apart from `pending`,
    /// so that polling or waiting for one does not walk the untracked steps an await loop
    /// leaves behind (its plan.update steps, up to STEP_SLOTS of them).
    tracked: VecDeque<Pending>,
    failed: Vec<StepFailure>,
}

impl StepState {
    /// The step `id`, if it is still pending.
    fn find(&self, id: StepId) -> Option<&Pending> {
        self.tracked.iter().rev().find(|p| p.id == id).or_else(|| self.pending.binary_search_by_key(&id, |p| p.id).ok().map(|i| &self.pending[i]))
    }
}

/// Where the step flags live (`MLA_STEP_FLAGS`).
enum Flags {
    /// Page-locked host memory mapped into the device's address space (`dev` is its device
    /// address), STEP_SLOTS + 1 ints: the kernels OR their bits straight into host memory
    /// (only on an error: no traffic otherwise), and the host reads a step's flag once the
    /// step has completed. Nothing is copied: a tracked step queues only its event, a
    /// harvest only waits. The default.
    Mapped { host: PinnedBuf, dev: u64 },
    /// Device memory, STEP_SLOTS + 1 ints, and two pinned copies: a tracked step's flag is
    /// copied into `tracked` after its work (4 bytes), a harvest copies every slot into
    /// `harvested` (4 KiB). With `MLA_STEP_FLAGS=device`, or where host memory cannot be
    /// mapped.
    Device { flags: DeviceBuffer, tracked: PinnedBuf, harvested: PinnedBuf },
}

/// The per-device log of steps and their error flags.
struct StepLog {
    /// One flag per slot, then the flag of work outside any step. Zero whenever a slot is
    /// free.
    flags: Flags,
    /// The device address of slot 0.
    flags_dev: u64,
    mem: Arc<MemCtx>,
    state: Mutex<StepState>,
    harvest_lock: Mutex<()>,
    ambient_used: AtomicBool,
}

fn read_int(buf: &PinnedBuf, i: usize) -> i32 {
    assert!(buf.len() >= (i + 1) * 4);
    // SAFETY: in bounds; the work that wrote slot `i` has completed (its event or a
    // synchronisation did; the device writes a flag only by atomics while its step runs).
    unsafe { std::ptr::read_volatile((buf.ptr() as *const i32).add(i)) }
}

impl StepLog {
    fn new(mem: &Arc<MemCtx>) -> Result<StepLog> {
        let n = (STEP_SLOTS + 1) * 4;
        let mapped = match std::env::var("MLA_STEP_FLAGS").as_deref() {
            Ok("device") => None,
            _ => PinnedBuf::new_mapped(&mem.ctx, n).ok(),
        };
        let flags = match mapped {
            Some((host, dev)) => Flags::Mapped { host, dev },
            None => {
                let flags = DeviceBuffer::alloc(mem, n)?;
                flags.fill(0)?;
                Flags::Device { flags, tracked: PinnedBuf::new(&mem.ctx, STEP_SLOTS * 4)?, harvested: PinnedBuf::new(&mem.ctx, n)? }
            }
        };
        let flags_dev = match &flags {
            Flags::Mapped { dev, .. } => *dev,
            Flags::Device { flags, .. } => flags.ptr(),
        };
        Ok(StepLog {
            flags,
            flags_dev,
            mem: mem.clone(),
            state: Mutex::new(StepState {
                next_id: 1,
                free: (0..STEP_SLOTS as u32).rev().collect(),
                pending: VecDeque::new(),
                tracked: VecDeque::new(),
                failed: Vec::new(),
            }),
            harvest_lock: Mutex::new(()),
            ambient_used: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, StepState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn slot_ptr(&self, slot: u32) -> u64 {
        self.flags_dev + 4 * slot as u64
    }
    fn ambient_ptr(&self) -> u64 {
        self.flags_dev + 4 * STEP_SLOTS as u64
    }
    /// Whether the flags are host memory the kernels write into (no copies).
    fn mapped(&self) -> bool {
        matches!(self.flags, Flags::Mapped { .. })
    }

    /// Queues after the step's work on `stream`: for a shared flag (a graph's, which the
    /// graph's first node clears), its copy into the slot; for a tracked step, with device
    /// flags the copy of its flag into its pinned slot, and an event (returned).
    fn finish(&self, mem: &MemCtx, stream: &CudaStream, slot: u32, shared: Option<u64>, tracked: bool) -> Result<Option<Arc<CudaEvent>>> {
        mem.ctx.bind_to_thread()?;
        let s = stream.cu_stream();
        unsafe {
            match &self.flags {
                Flags::Mapped { .. } => {
                    if let Some(f) = shared {
                        // Device int -> mapped host int (a unified-address copy).
                        sys::cuMemcpyAsync(self.slot_ptr(slot), f, 4, s).result()?;
                    }
                }
                Flags::Device { tracked: pinned, .. } => {
                    if tracked {
                        let dst = (pinned.ptr() as *mut i32).add(slot as usize) as *mut c_void;
                        sys::cuMemcpyDtoHAsync_v2(dst, shared.unwrap_or(self.slot_ptr(slot)), 4, s).result()?;
                    } else if let Some(f) = shared {
                        sys::cuMemcpyDtoDAsync_v2(self.slot_ptr(slot), f, 4, s).result()?;
                    }
                }
            }
        }
        if !tracked {
            return Ok(None);
        }
        let ev = mem.event()?;
        ev.record(stream)?;
        Ok(Some(Arc::new(ev)))
    }

    /// Queues what a harvest reads behind the work queued so far on the device's stream:
    /// with device flags the copy of every slot into `harvested` and an event; with mapped
    /// flags an event when `event` asks for one (a wait for the whole device needs none).
    fn queue_harvest(&self, mem: &MemCtx, stream: &CudaStream, event: bool) -> Result<Option<CudaEvent>> {
        mem.ctx.bind_to_thread()?;
        if let Flags::Device { flags, harvested, .. } = &self.flags {
            unsafe {
                sys::cuMemcpyDtoHAsync_v2(harvested.ptr() as *mut c_void, flags.ptr(), (STEP_SLOTS + 1) * 4, stream.cu_stream()).result()?;
            }
        } else if !event {
            return Ok(None);
        }
        let ev = mem.event()?;
        ev.record(stream)?;
        Ok(Some(ev))
    }

    /// A completed tracked step's flag.
    fn read_tracked(&self, slot: u32) -> i32 {
        match &self.flags {
            Flags::Mapped { host, .. } => read_int(host, slot as usize),
            Flags::Device { tracked, .. } => read_int(tracked, slot as usize),
        }
    }

    /// Slot `i`'s flag as of the last completed harvest.
    fn read_harvested(&self, i: usize) -> i32 {
        match &self.flags {
            Flags::Mapped { host, .. } => read_int(host, i),
            Flags::Device { harvested, .. } => read_int(harvested, i),
        }
    }

    /// A step's flag was read as `bits`: free its slot (cleared first when set) and record
    /// the failure.
    fn settle(&self, st: &mut StepState, stream: &CudaStream, p: Pending, bits: i32) -> Result<()> {
        if bits != 0 {
            self.clear_slot_sync(stream, p.slot as usize)?;
            if !p.known {
                st.failed.push(StepFailure { id: p.id, label: p.label, bits });
            }
        }
        st.free.push(p.slot);
        Ok(())
    }

    /// Tracked steps whose event completed.
    fn resolve_tracked(&self, st: &mut StepState, stream: &CudaStream) -> Result<()> {
        let mut i = 0;
        while i < st.tracked.len() {
            let done = match &st.tracked[i].event {
                Some(e) => e.try_is_complete()?,
                None => true,
            };
            if !done {
                i += 1;
                continue;
            }
            let mut p = st.tracked.remove(i).unwrap();
            let bits = self.read_tracked(p.slot);
            // Taken, not cloned: a clone would keep the count above one, so the event would
            // never go back to the pool (destroyed here, created anew by the next step).
            if let Some(ev) = p.event.take().and_then(|e| Arc::try_unwrap(e).ok()) {
                self.mem.recycle(ev);
            }
            self.settle(st, stream, p, bits)?;
        }
        Ok(())
    }

    /// Untracked steps below `cover`, from a completed harvest (they ran before it on the
    /// device's stream), and the flag of work outside any step.
    fn resolve_harvested(&self, st: &mut StepState, stream: &CudaStream, cover: StepId) -> Result<()> {
        while st.pending.front().is_some_and(|p| p.id < cover) {
            let p = st.pending.pop_front().unwrap();
            let bits = self.read_harvested(p.slot as usize);
            self.settle(st, stream, p, bits)?;
        }
        let ambient = self.read_harvested(STEP_SLOTS);
        if ambient != 0 && self.ambient_used.swap(false, Ordering::AcqRel) {
            self.clear_slot_sync(stream, STEP_SLOTS)?;
            st.failed.push(StepFailure { id: 0, label: "work outside a step".into(), bits: ambient });
        }
        Ok(())
    }

    /// Zeroes a flag (slot `i`, or STEP_SLOTS for work outside a step) before it is reused
    /// (after a failure only): mapped flags by a host store (nothing on the device uses the
    /// slot now: its step completed), device flags by a memset that this waits for.
    fn clear_slot_sync(&self, stream: &CudaStream, i: usize) -> Result<()> {
        match &self.flags {
            Flags::Mapped { host, .. } => {
                // SAFETY: within the array; no queued work writes this slot (see above).
                unsafe { std::ptr::write_volatile((host.ptr() as *mut i32).add(i), 0) };
                std::sync::atomic::fence(Ordering::SeqCst);
            }
            Flags::Device { flags, .. } => {
                unsafe { sys::cuMemsetD32Async(flags.ptr() + 4 * i as u64, 0, 1, stream.cu_stream()).result()? };
                stream.synchronize()?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_old_driver_gets_its_own_code_and_both_versions() {
        let e = super::driver_too_old((11, 8));
        assert_eq!(e.code.as_str(), "ERR_DRIVER_TOO_OLD");
        assert!(e.message.contains("CUDA 12.0 or newer") && e.message.contains("CUDA 11.8"), "{}", e.message);
        assert!((11, 8) < crate::device::info::MIN_DRIVER_CUDA_VERSION && (12, 0) >= crate::device::info::MIN_DRIVER_CUDA_VERSION);
    }

    #[test]
    fn status_names_the_kernel_compiler_and_the_driver_version() {
        let s = super::status();
        assert_eq!(s.kernels_built, !s.kernels_compiler.is_empty(), "{s:?}");
        if s.driver_version.is_none() {
            assert!(!s.available, "{s:?}");
        }
    }
}
