//! Kernel launches: one parameter struct passed by value, on a stream of the caller's choice.

use std::ffi::c_void;

use cudarc::driver::{result, sys, CudaFunction, CudaStream, DeviceRepr};

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

/// Launches `f` like [`launch`], as a programmatic dependent of the kernel before it on
/// the stream (`cuLaunchKernelEx` with programmatic stream serialisation): it may start
/// while that kernel finishes, and must execute `griddepcontrol.wait` before it reads
/// anything the earlier kernel writes (`pdl_wait` in `kernels/sm90/tma.cuh`).
///
/// # Safety
/// As [`launch`]; and the kernel must wait as said before reading its predecessor's output.
pub unsafe fn launch_dependent<P: DeviceRepr>(f: &CudaFunction, stream: &CudaStream, dims: &LaunchDims, params: &P) -> Result<()> {
    let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    launch_ex(f, stream, dims, &mut attr, params)
}

/// Launches `f` like [`launch`] in thread block clusters of `cluster` CTAs (each grid
/// dimension a multiple of the cluster's).
///
/// # Safety
/// As [`launch`].
pub unsafe fn launch_cluster<P: DeviceRepr>(f: &CudaFunction, stream: &CudaStream, dims: &LaunchDims, cluster: (u32, u32, u32), params: &P) -> Result<()> {
    let mut attr = cluster_attr(cluster);
    launch_ex(f, stream, dims, &mut attr, params)
}

/// How many clusters of `cluster` CTAs of `f`, launched as `dims`, the device can run at once
/// (`cuOccupancyMaxActiveClusters`: it depends on how the SMs are grouped, not only their count).
pub fn max_active_clusters(f: &CudaFunction, stream: &CudaStream, dims: &LaunchDims, cluster: (u32, u32, u32)) -> Result<u32> {
    stream.context().bind_to_thread()?;
    let mut attr = cluster_attr(cluster);
    let config = launch_config(stream, dims, &mut attr);
    let mut n: std::ffi::c_int = 0;
    unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &config).result()? };
    Ok(n.max(0) as u32)
}

fn cluster_attr(cluster: (u32, u32, u32)) -> sys::CUlaunchAttribute {
    // SAFETY: a plain C struct and union, valid when zeroed.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = cluster.0;
    attr.value.clusterDim.y = cluster.1;
    attr.value.clusterDim.z = cluster.2;
    attr
}

fn launch_config(stream: &CudaStream, dims: &LaunchDims, attr: &mut sys::CUlaunchAttribute) -> sys::CUlaunchConfig {
    sys::CUlaunchConfig {
        gridDimX: dims.grid.0,
        gridDimY: dims.grid.1,
        gridDimZ: dims.grid.2,
        blockDimX: dims.block.0,
        blockDimY: dims.block.1,
        blockDimZ: dims.block.2,
        sharedMemBytes: dims.smem,
        hStream: stream.cu_stream(),
        attrs: attr,
        numAttrs: 1,
    }
}

/// `cuLaunchKernelEx` with one launch attribute.
unsafe fn launch_ex<P: DeviceRepr>(f: &CudaFunction, stream: &CudaStream, dims: &LaunchDims, attr: &mut sys::CUlaunchAttribute, params: &P) -> Result<()> {
    stream.context().bind_to_thread()?;
    let config = launch_config(stream, dims, attr);
    let mut args = [params as *const P as *mut c_void];
    sys::cuLaunchKernelEx(&config, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()).result()?;
    Ok(())
}

/// Whether the combine is launched as a programmatic dependent of the decode
/// (MLA_PDL=1): off until measured on the H200 (BENCHMARKS.md).
pub fn pdl_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MLA_PDL").as_deref() == Ok("1"))
}
