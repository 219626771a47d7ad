//! CUDA-graph capture of decode steps: capture plan + decode + combine once, then replay
//! with new lengths written into the same device tensors (no host synchronisation).

use std::sync::Arc;

use cudarc::driver::{sys, CudaGraph, CudaStream};

use crate::error::{ErrorCode, MlaError, Result};

/// Captures the work `body` enqueues on `stream` into an instantiated graph. Everything
/// `body` enqueues must go to `stream` (pass it as `DecodeOptions::stream` and to
/// `replan_on`); run the same step once before capturing so kernels are loaded.
///
/// # Safety
/// The graph holds the raw device addresses of every tensor and plan the captured work
/// touches: they must all outlive every launch of the returned graph.
pub unsafe fn capture(stream: &Arc<CudaStream>, body: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
    let r = body();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0))?;
    r?;
    graph.ok_or_else(|| MlaError::new(ErrorCode::Cuda, "stream capture produced no graph"))
}
