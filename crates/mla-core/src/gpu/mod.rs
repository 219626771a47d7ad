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
pub mod tma;

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, sys, CudaContext, CudaStream};

pub use buffer::DeviceBuffer;

use crate::device::{DeviceInfo, GpuStatus, MIN_DRIVER_CUDA_VERSION};
use crate::error::{ErrorCode, MlaError, Result};

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
    GpuStatus {
        available: reason.is_none(),
        device_count: count,
        kernels_built,
        kernels_compiler: mla_kernels::COMPILER,
        driver_version: driver_version(),
        reason,
    }
}

/// One opened CUDA device: its primary context, a default stream, the loaded kernels and
/// the device-side error flag that kernels set on bad device-resident input.
pub struct GpuDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    kernels: kernels::Kernels,
    error_flag: DeviceBuffer,
    /// Held from a step's launch until its error flag is read (see `run_step`).
    step_lock: Mutex<()>,
}

/// One `GpuDevice` per ordinal in the process, so that every handle to a GPU shares its
/// stream (ordering) and its error flag.
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
        let error_flag = DeviceBuffer::alloc(&ctx, &stream, 4)?;
        error_flag.fill(0)?;
        Ok(Arc::new(GpuDevice { ordinal, ctx, stream, info, kernels, error_flag, step_lock: Mutex::new(()) }))
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
    /// Device address of the error flag (an int kernels OR `MLA_ERR_*` bits into).
    pub fn error_flag_ptr(&self) -> u64 {
        self.error_flag.ptr()
    }
    pub fn free_memory(&self) -> Result<u64> {
        self.ctx.bind_to_thread()?;
        Ok(result::mem_get_info()?.0 as u64)
    }

    pub fn alloc_zeroed(&self, nbytes: usize) -> Result<DeviceBuffer> {
        let b = DeviceBuffer::alloc(&self.ctx, &self.stream, nbytes)?;
        b.fill(0)?;
        Ok(b)
    }

    /// An allocation whose contents are left as they are (no memset queued).
    pub fn alloc_uninit(&self, nbytes: usize) -> Result<DeviceBuffer> {
        DeviceBuffer::alloc(&self.ctx, &self.stream, nbytes)
    }

    pub fn upload(&self, bytes: &[u8]) -> Result<DeviceBuffer> {
        let mut b = DeviceBuffer::alloc(&self.ctx, &self.stream, bytes.len())?;
        b.write(0, bytes)?;
        Ok(b)
    }

    /// Waits for every stream of this context, then turns a flagged device error into a
    /// typed error (and clears the flag).
    pub fn synchronize(&self) -> Result<()> {
        let _step = self.step_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sync_and_take_error()
    }

    /// See [`crate::Device::run_step`].
    pub fn run_step<T>(&self, enqueue: impl FnOnce() -> Result<T>) -> Result<T> {
        let _step = self.step_lock.lock().unwrap_or_else(|e| e.into_inner());
        let r = enqueue();
        // Even when enqueueing failed half-way, wait and clear what was flagged, so that
        // no error leaks into the next step.
        let s = self.sync_and_take_error();
        let v = r?;
        s.map(|_| v)
    }

    fn sync_and_take_error(&self) -> Result<()> {
        self.ctx.synchronize()?;
        let bytes = self.error_flag.download()?;
        let flag = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if flag == 0 {
            return Ok(());
        }
        self.error_flag.fill(0)?;
        self.stream.synchronize()?; // cleared before any later step can flag again
        if flag & params::MLA_ERR_BLOCK_INDEX != 0 {
            return Err(MlaError::new(
                ErrorCode::BlockIndexOutOfRange,
                "block_table: a device-resident block index that would be read is outside [0, num_blocks); \
                 the kernel skipped it and the outputs of this step are not valid",
            ));
        }
        if flag & params::MLA_ERR_SEQLEN != 0 {
            return Err(MlaError::new(
                ErrorCode::SeqlenOutOfRange,
                "cache_seqlens: a device-resident length is outside [0, max_blocks_per_seq * 64]; \
                 the outputs of this step are not valid",
            ));
        }
        Err(MlaError::new(
            ErrorCode::InvalidArgument,
            "plan: the scheduling metadata does not fit these cache_seqlens (a plan made for other \
             lengths: call replan after the lengths change); the outputs of this step are not valid",
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_old_driver_gets_its_own_code_and_both_versions() {
        let e = super::driver_too_old((11, 8));
        assert_eq!(e.code.as_str(), "ERR_DRIVER_TOO_OLD");
        assert!(e.message.contains("CUDA 12.0 or newer") && e.message.contains("CUDA 11.8"), "{}", e.message);
        assert!((11, 8) < crate::device::MIN_DRIVER_CUDA_VERSION && (12, 0) >= crate::device::MIN_DRIVER_CUDA_VERSION);
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
