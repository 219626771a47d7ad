//! The CUDA runtime: device discovery, memory, streams and the embedded sm_90a kernels.
//!
//! libcuda is loaded at run time (cudarc's dynamic loading), and only after checking that
//! it exists, so a process on a machine without a driver gets `ERR_GPU_UNAVAILABLE`
//! instead of a crash.

mod buffer;
pub mod graph;
pub mod kernels;
pub mod ops;
pub mod util;
pub mod launch;
pub mod params;

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};

pub(crate) use buffer::{MemCtx, PinnedBuf};
pub use buffer::{DeviceBuffer, PoolStats};

use crate::device::{DeviceInfo, GpuStatus};
use crate::error::{ErrorCode, MlaError, Result};

/// Why the CUDA driver cannot be used at all (checked once per process).
fn driver_problem() -> Option<String> {
    static PROBLEM: OnceLock<Option<String>> = OnceLock::new();
    PROBLEM
        .get_or_init(|| {
            // SAFETY: only probes dlopen; no driver symbol is touched when absent.
            if !unsafe { sys::is_culib_present() } {
                return Some("the CUDA driver library (libcuda.so) was not found".into());
            }
            match std::panic::catch_unwind(result::init) {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("cuInit failed: {e:?}")),
                Err(_) => Some("the CUDA driver library could not be loaded".into()),
            }
        })
        .clone()
}

fn device_count() -> Result<usize> {
    if let Some(p) = driver_problem() {
        return Err(MlaError::new(ErrorCode::GpuUnavailable, p));
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
    GpuStatus { available: reason.is_none(), device_count: count, kernels_built, reason }
}

/// One opened CUDA device: its primary context, a default stream, the loaded kernels, its
/// memory (pool, staging ring, events) and the log of enqueued steps with their error flags.
pub struct GpuDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    kernels: kernels::Kernels,
    mem: Arc<MemCtx>,
    steps: StepLog,
}

/// One `GpuDevice` per ordinal in the process, so that every handle to a GPU shares its
/// stream (ordering) and its step log.
static OPEN: Mutex<Vec<(usize, std::sync::Weak<GpuDevice>)>> = Mutex::new(Vec::new());

impl GpuDevice {
    /// The device `ordinal`, opened on first use and shared while any handle lives.
    pub fn open(ordinal: usize) -> Result<Arc<GpuDevice>> {
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(g) = open.iter().find(|(o, _)| *o == ordinal).and_then(|(_, w)| w.upgrade()) {
            return Ok(g);
        }
        let g = GpuDevice::create(ordinal)?;
        open.push((ordinal, Arc::downgrade(&g)));
        Ok(g)
    }

    fn create(ordinal: usize) -> Result<Arc<GpuDevice>> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(MlaError::arg(ErrorCode::GpuUnavailable, "device", format!("an ordinal below {count}"), ordinal));
        }
        if !mla_kernels::available() {
            return Err(MlaError::new(
                ErrorCode::KernelsUnavailable,
                format!("this build has no GPU kernels: {}", mla_kernels::UNAVAILABLE_REASON),
            ));
        }
        let ctx = CudaContext::new(ordinal)?;
        // Buffers here are raw allocations ordered on our own streams.
        unsafe { ctx.disable_event_tracking() };
        let cc = ctx.compute_capability()?;
        if cc != (9, 0) {
            return Err(MlaError::arg(
                ErrorCode::GpuUnavailable,
                "device compute capability",
                "9.0 (Hopper: the kernels are sm_90a)",
                format!("{}.{}", cc.0, cc.1),
            ));
        }
        let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let info = DeviceInfo {
            kind: "cuda",
            name: ctx.name()?,
            ordinal,
            compute_capability: cc,
            multiprocessors: sms,
            total_memory: ctx.total_mem()? as u64,
        };
        let stream = ctx.new_stream()?;
        let kernels = kernels::Kernels::load(&ctx)?;
        let mem = MemCtx::new(&ctx, &stream, ordinal)?;
        let steps = StepLog::new(&mem)?;
        stream.synchronize()?;
        Ok(Arc::new(GpuDevice { ordinal, ctx, stream, info, kernels, mem, steps }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
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
    /// returns its id, without waiting for the device.
    ///
    /// Every step has an error flag of its own: kernels launched by `enqueue` (on this
    /// thread) OR their `MLA_ERR_*` bits into it ([`GpuDevice::error_flag_ptr`]). After the
    /// step's work, a 4-byte copy of the flag into pinned host memory and an event are queued
    /// on `stream`. A later synchronising call ([`GpuDevice::synchronize`],
    /// [`GpuDevice::wait_step`], reading a tensor) looks at the flags of the steps that have
    /// completed and reports the first one that failed as a typed error naming the step
    /// (`step 12 (decode): block_table: ...`). A failed step's flag is cleared before its slot
    /// is reused, so a bad step never marks a later one.
    ///
    /// A step inside a step (on the same thread) is part of the outer step.
    ///
    /// When `enqueue` fails, its error is returned (and whatever it launched is still tracked,
    /// so that nothing leaks into a later step).
    pub fn step<T>(&self, label: impl Into<Cow<'static, str>>, stream: &Arc<CudaStream>, enqueue: impl FnOnce() -> Result<T>) -> Result<(StepId, T)> {
        self.step_inner(label.into(), stream, None, enqueue)
    }

    /// A step whose kernels were given `flag` (a device int) at capture time instead of a
    /// slot of the log (a CUDA graph's own flag): its copy is taken from `flag`, which is then
    /// cleared in stream order.
    pub(crate) fn step_with_flag<T>(&self, label: Cow<'static, str>, stream: &Arc<CudaStream>, flag: u64, enqueue: impl FnOnce() -> Result<T>) -> Result<(StepId, T)> {
        self.step_inner(label, stream, Some(flag), enqueue)
    }

    fn step_inner<T>(&self, label: Cow<'static, str>, stream: &Arc<CudaStream>, shared: Option<u64>, enqueue: impl FnOnce() -> Result<T>) -> Result<(StepId, T)> {
        if let Some(c) = current_step(self) {
            return enqueue().map(|v| (c.id, v));
        }
        let mut st = self.steps.lock();
        let slot = self.steps.take_slot(&mut st)?;
        let id = st.next_id;
        st.next_id += 1;
        let flag = self.steps.slot_ptr(slot);
        let r = {
            let _in = StepGuard::enter(CurrentStep { device: key(self), flag, id });
            enqueue()
        };
        let event = match self.steps.finish(&self.mem, stream, slot, shared) {
            Ok(e) => e,
            Err(e) => {
                // Nothing tracks the step: wait for it here and look at its flag now.
                let _ = self.ctx.synchronize();
                let _ = self.steps.clear_slot_sync(&self.stream, slot);
                st.free.push(slot);
                return Err(e);
            }
        };
        st.pending.push_back(Pending { id, label, slot, event: Arc::new(event), known: r.is_err(), shared });
        r.map(|v| (id, v))
    }

    /// The id of the step this thread is enqueueing on this device, if any.
    pub fn current_step(&self) -> Option<StepId> {
        current_step(self).map(|c| c.id)
    }

    /// Waits until step `id` has completed and reports its own error (a failed step is
    /// reported once: here, or by the next synchronising call when nobody waited for it).
    /// Errors of other steps stay for the next [`GpuDevice::synchronize`].
    pub fn wait_step(&self, id: StepId) -> Result<()> {
        if current_step(self).is_some() {
            return Err(MlaError::new(ErrorCode::InvalidArgument, "wait_step: called while enqueueing a step on this thread"));
        }
        let ev = {
            let st = self.steps.lock();
            if id == 0 || id >= st.next_id {
                return Err(MlaError::arg(ErrorCode::InvalidArgument, "step", format!("the id of a step enqueued on this device (1..{})", st.next_id), id));
            }
            st.pending.iter().find(|p| p.id == id).map(|p| p.event.clone())
        };
        if let Some(ev) = ev {
            ev.synchronize()?;
        }
        let mut st = self.steps.lock();
        self.steps.resolve(&mut st, &self.mem, &self.stream)?;
        match st.failed.iter().position(|f| f.id == id) {
            Some(i) => Err(st.failed.remove(i).into_error(&[])),
            None => Ok(()),
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
        let epoch = self.mem.epoch();
        self.ctx.synchronize()?;
        self.mem.mark_clean(epoch);
        let mut st = self.steps.lock();
        self.steps.resolve(&mut st, &self.mem, &self.stream)?;
        if self.steps.ambient_used.swap(false, Ordering::AcqRel) {
            let bits = self.steps.take_ambient(&self.stream)?;
            if bits != 0 {
                st.failed.push(StepFailure { id: 0, label: "work outside a step".into(), bits });
            }
        }
        report(&mut st)
    }

    /// Reports (without waiting) the first failed step among those that have completed:
    /// what a host read of device memory calls after its own wait.
    pub fn check_steps(&self) -> Result<()> {
        if current_step(self).is_some() {
            return Ok(()); // the step is still being enqueued: nothing of it has completed
        }
        let mut st = self.steps.lock();
        self.steps.resolve(&mut st, &self.mem, &self.stream)?;
        report(&mut st)
    }

    /// See [`crate::Device::run_step`].
    pub fn run_step<T>(&self, enqueue: impl FnOnce() -> Result<T>) -> Result<T> {
        if current_step(self).is_some() {
            return enqueue();
        }
        let (id, v) = self.step("step", &self.stream.clone(), enqueue)?;
        self.wait_step(id)?;
        Ok(v)
    }

    /// Steps enqueued and not yet looked at (their completion unknown to the log).
    pub fn pending_steps(&self) -> usize {
        self.steps.lock().pending.len()
    }

    pub fn memory_stats(&self) -> PoolStats {
        self.mem.stats()
    }
}

/// Id of an enqueued step: per device, 1, 2, 3, ... (0 names work outside any step).
pub type StepId = u64;

/// Step slots of a device's log: at most this many steps are in flight and not yet looked
/// at; the next one waits for the oldest.
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
    event: Arc<CudaEvent>,
    /// Its enqueue failed and returned that error: flags are cleared, not reported.
    known: bool,
    /// The flag its kernels used, when not its slot's (a graph's own flag).
    shared: Option<u64>,
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
    pending: VecDeque<Pending>,
    failed: Vec<StepFailure>,
}

/// The per-device log of steps and their error flags.
struct StepLog {
    /// STEP_SLOTS + 1 ints on the device: one flag per slot, then the flag of work outside
    /// any step. Zero whenever a slot is free.
    flags: DeviceBuffer,
    /// STEP_SLOTS ints of pinned host memory: each step's flag, copied after its work.
    host: PinnedBuf,
    state: Mutex<StepState>,
    ambient_used: AtomicBool,
}

impl StepLog {
    fn new(mem: &Arc<MemCtx>) -> Result<StepLog> {
        let flags = DeviceBuffer::alloc(mem, (STEP_SLOTS + 1) * 4)?;
        flags.fill(0)?;
        let host = PinnedBuf::new(&mem.ctx, STEP_SLOTS * 4)?;
        Ok(StepLog {
            flags,
            host,
            state: Mutex::new(StepState { next_id: 1, free: (0..STEP_SLOTS as u32).rev().collect(), pending: VecDeque::new(), failed: Vec::new() }),
            ambient_used: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, StepState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn slot_ptr(&self, slot: u32) -> u64 {
        self.flags.ptr() + 4 * slot as u64
    }
    fn ambient_ptr(&self) -> u64 {
        self.flags.ptr() + 4 * STEP_SLOTS as u64
    }
    fn host_slot(&self, slot: u32) -> *mut i32 {
        debug_assert!((slot as usize) < STEP_SLOTS && self.host.len() >= STEP_SLOTS * 4);
        unsafe { (self.host.ptr() as *mut i32).add(slot as usize) }
    }

    /// A free slot; when all are taken, waits for the oldest pending step.
    fn take_slot(&self, st: &mut StepState) -> Result<u32> {
        if let Some(s) = st.free.pop() {
            return Ok(s);
        }
        let mem = &self.flags.mem_ctx();
        self.resolve(st, mem, &mem.stream)?;
        while st.free.is_empty() {
            let ev = st.pending.front().expect("no free slot means pending steps").event.clone();
            ev.synchronize()?;
            self.resolve(st, mem, &mem.stream)?;
        }
        Ok(st.free.pop().unwrap())
    }

    /// Queues, after the step's work on `stream`, the copy of its flag into its host slot
    /// (and for a shared flag the clear), then records the step's event.
    fn finish(&self, mem: &MemCtx, stream: &CudaStream, slot: u32, shared: Option<u64>) -> Result<CudaEvent> {
        mem.ctx.bind_to_thread()?;
        let src = shared.unwrap_or(self.slot_ptr(slot));
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(self.host_slot(slot) as *mut c_void, src, 4, stream.cu_stream()).result()?;
            if shared.is_some() {
                sys::cuMemsetD32Async(src, 0, 1, stream.cu_stream()).result()?;
            }
        }
        let ev = mem.event()?;
        ev.record(stream)?;
        Ok(ev)
    }

    /// Looks at every pending step that has completed: frees its slot and records it as
    /// failed when its flag is set.
    fn resolve(&self, st: &mut StepState, mem: &MemCtx, stream: &CudaStream) -> Result<()> {
        let mut i = 0;
        while i < st.pending.len() {
            if !st.pending[i].event.try_is_complete()? {
                i += 1;
                continue;
            }
            let p = st.pending.remove(i).unwrap();
            let host = self.host_slot(p.slot);
            // SAFETY: the copy into the slot completed (its event did).
            let bits = unsafe { std::ptr::read_volatile(host) };
            if bits != 0 {
                unsafe { std::ptr::write_volatile(host, 0) };
                if p.shared.is_none() {
                    self.clear_slot_sync(stream, p.slot)?;
                }
                if !p.known {
                    st.failed.push(StepFailure { id: p.id, label: p.label, bits });
                }
            }
            st.free.push(p.slot);
            if let Ok(ev) = Arc::try_unwrap(p.event) {
                mem.recycle(ev);
            }
        }
        Ok(())
    }

    /// Zeroes a slot's device flag before the slot is reused (on a failure only).
    fn clear_slot_sync(&self, stream: &CudaStream, slot: u32) -> Result<()> {
        unsafe { sys::cuMemsetD32Async(self.slot_ptr(slot), 0, 1, stream.cu_stream()).result()? };
        stream.synchronize()?;
        Ok(())
    }

    /// Reads and clears the flag of work outside any step (after a whole-device wait).
    fn take_ambient(&self, stream: &CudaStream) -> Result<i32> {
        let b = self.flags.download_range(4 * STEP_SLOTS, 4)?;
        let bits = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if bits != 0 {
            unsafe { sys::cuMemsetD32Async(self.ambient_ptr(), 0, 1, stream.cu_stream()).result()? };
            stream.synchronize()?;
        }
        Ok(bits)
    }
}
