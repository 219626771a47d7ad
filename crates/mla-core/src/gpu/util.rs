//! Device-side helpers for benchmarks and tests: random fills and the copy ceiling.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaStream};

use super::launch::{launch_args, LaunchDims};
use super::GpuDevice;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{ErrorCode, MlaError, Result};
use crate::tensor::Tensor;

/// Fills a bf16 / fp16 CUDA tensor with approximately normal(0, std) values, clamped to
/// [-clamp, clamp] when clamp > 0, generated on the device from `seed`.
pub fn fill_random(t: &mut Tensor, seed: u64, std: f32, clamp: f32) -> Result<()> {
    let g = match t.device() {
        Device::Cuda(g) => g.clone(),
        Device::Cpu => return Err(MlaError::new(ErrorCode::DeviceMismatch, "fill_random: a CUDA tensor is needed")),
    };
    let entry = match t.dtype() {
        DType::BF16 => mla_kernels::entries::MLA_FILL_RANDOM_BF16,
        DType::F16 => mla_kernels::entries::MLA_FILL_RANDOM_FP16,
        d => return Err(MlaError::arg(ErrorCode::DtypeMismatch, "tensor", "bf16 or fp16", d)),
    };
    let (f, _) = g.kernels().function(entry)?;
    let (mut ptr, mut n, mut seed, mut std, mut clamp) = (t.device_ptr().unwrap(), t.numel() as u64, seed, std, clamp);
    let mut args = [
        &mut ptr as *mut u64 as *mut c_void,
        &mut n as *mut u64 as *mut c_void,
        &mut seed as *mut u64 as *mut c_void,
        &mut std as *mut f32 as *mut c_void,
        &mut clamp as *mut f32 as *mut c_void,
    ];
    let dims = LaunchDims { grid: (g.info().multiprocessors as u32 * 8, 1, 1), block: (256, 1, 1), smem: 0 };
    unsafe { launch_args(&f, g.stream(), &dims, &mut args) }
}

/// Scatters `n` latent rows into a paged cache pool, on the device's stream (the kernel of
/// `kernels/common/cache/mla_cache_append.cu`): row `i` (`row_bytes` bytes at `src + i * src_stride`)
/// goes to token slot `slots[i]` (int64, block * 64 + row) of `pool`. A slot outside
/// `[0, num_slots)` is skipped and flagged (`MLA_ERR_BLOCK_INDEX`) in the current step's
/// flag. Pointers and strides must be 16-byte aligned.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cache_scatter(g: &GpuDevice, pool: u64, num_slots: i64, src: u64, src_stride: i64, slots: u64, n: i64, row_bytes: i32) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    debug_assert!(row_bytes % 16 == 0 && src_stride % 16 == 0 && pool % 16 == 0 && src % 16 == 0);
    let (f, _) = g.kernels().function(mla_kernels::entries::MLA_CACHE_APPEND)?;
    let (mut pool, mut num_slots, mut src, mut stride_vec, mut slots, mut n, mut row_vecs, mut flag) =
        (pool, num_slots, src, src_stride / 16, slots, n, row_bytes / 16, g.error_flag_ptr());
    let mut args = [
        &mut pool as *mut u64 as *mut c_void,
        &mut num_slots as *mut i64 as *mut c_void,
        &mut src as *mut u64 as *mut c_void,
        &mut stride_vec as *mut i64 as *mut c_void,
        &mut slots as *mut u64 as *mut c_void,
        &mut n as *mut i64 as *mut c_void,
        &mut row_vecs as *mut i32 as *mut c_void,
        &mut flag as *mut u64 as *mut c_void,
    ];
    let threads = n as u64 * row_vecs as u64;
    let blocks = threads.div_ceil(256).clamp(1, g.info().multiprocessors as u64 * 8) as u32;
    let dims = LaunchDims { grid: (blocks, 1, 1), block: (256, 1, 1), smem: 0 };
    unsafe { launch_args(&f, g.stream(), &dims, &mut args) }
}

/// Milliseconds between two points on a stream, measured with CUDA events.
pub struct Timer {
    start: cudarc::driver::CudaEvent,
    stop: cudarc::driver::CudaEvent,
    stream: Arc<CudaStream>,
}

impl Timer {
    pub fn new(g: &GpuDevice, stream: &Arc<CudaStream>) -> Result<Timer> {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok(Timer { start: g.context().new_event(flags)?, stop: g.context().new_event(flags)?, stream: stream.clone() })
    }
    pub fn start(&self) -> Result<()> {
        Ok(self.start.record(&self.stream)?)
    }
    /// Records the stop event, waits for it and returns the elapsed milliseconds.
    pub fn stop(&self) -> Result<f32> {
        self.stop.record(&self.stream)?;
        self.stop.synchronize()?;
        Ok(self.start.elapsed_ms(&self.stop)?)
    }
}

/// Back-to-back intervals on a stream: `n + 1` CUDA events, recorded between the
/// iterations of a loop that never waits on the host, so the stream stays full and each
/// interval is one iteration's device time.
pub struct Stamps {
    events: Vec<cudarc::driver::CudaEvent>,
    stream: Arc<CudaStream>,
}

impl Stamps {
    /// `n + 1` events (at least 2) on `stream`.
    pub fn new(g: &GpuDevice, stream: &Arc<CudaStream>, n: usize) -> Result<Stamps> {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let events = (0..n.max(1) + 1).map(|_| g.context().new_event(flags)).collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Stamps { events, stream: stream.clone() })
    }
    fn event(&self, i: usize) -> Result<&cudarc::driver::CudaEvent> {
        self.events.get(i).ok_or_else(|| MlaError::arg(ErrorCode::InvalidArgument, "stamp", format!("below {}", self.events.len()), i))
    }
    /// Records event `i` (0 before the first iteration, `i` after iteration `i`).
    pub fn record(&self, i: usize) -> Result<()> {
        Ok(self.event(i)?.record(&self.stream)?)
    }
    /// Whether the work before event `i` has completed (true before it is first recorded).
    pub fn is_complete(&self, i: usize) -> Result<bool> {
        Ok(self.event(i)?.try_is_complete()?)
    }
    /// Waits for the last event and returns the `n` intervals in milliseconds.
    pub fn intervals_ms(&self) -> Result<Vec<f64>> {
        self.events.last().expect("at least two events").synchronize()?;
        self.events.windows(2).map(|w| Ok(w[0].elapsed_ms(&w[1])? as f64)).collect()
    }
}

/// The device-to-device copy ceiling in GB/s (bytes read + bytes written), as the
/// contract measures it: median of `reps` copies of `bytes` bytes.
pub fn copy_ceiling_gbps(g: &GpuDevice, bytes: usize, reps: usize) -> Result<f64> {
    let src = g.alloc_zeroed(bytes)?;
    let dst = g.alloc_zeroed(bytes)?;
    let stream = g.stream();
    let timer = Timer::new(g, stream)?;
    let mut times = Vec::with_capacity(reps);
    for i in 0..reps + 2 {
        timer.start()?;
        unsafe { result::memcpy_dtod_async(dst.ptr(), src.ptr(), bytes, stream.cu_stream())? };
        let ms = timer.stop()?;
        if i >= 2 {
            times.push(ms as f64);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[times.len() / 2];
    Ok(2.0 * bytes as f64 / (med * 1e-3) / 1e9)
}
