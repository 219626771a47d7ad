//! Kernel launches: one parameter struct passed by value, on a stream of the caller's choice.

use std::ffi::c_void;

use cudarc::driver::{result, CudaFunction, CudaStream, DeviceRepr};

use crate::error::Result;

pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem: u32,
}

/// Launches `f` with `params` as its only argument. Errors from the launch itself are
/// returned; errors raised while the kernel runs surface at the next synchronisation.
///
/// # Safety
/// Every device pointer inside `params` must stay valid until the kernel has finished,
/// and `P` must match the kernel's parameter struct.
pub unsafe fn launch<P: DeviceRepr>(f: &CudaFunction, stream: &CudaStream, dims: &LaunchDims, params: &P) -> Result<()> {
    stream.context().bind_to_thread()?;
    let mut args = [params as *const P as *mut c_void];
    result::launch_kernel(f.cu_function(), dims.grid, dims.block, dims.smem, stream.cu_stream(), &mut args)?;
    Ok(())
}

/// Launches `f` with an explicit argument list (pointers to each argument value).
///
/// # Safety
/// As [`launch`]; `args` must match the kernel's parameter list.
pub unsafe fn launch_args(f: &CudaFunction, stream: &CudaStream, dims: &LaunchDims, args: &mut [*mut c_void]) -> Result<()> {
    stream.context().bind_to_thread()?;
    result::launch_kernel(f.cu_function(), dims.grid, dims.block, dims.smem, stream.cu_stream(), args)?;
    Ok(())
}
