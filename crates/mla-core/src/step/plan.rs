//! What a plan is: the scheduling metadata of one decode step and, on CUDA, the workspace
//! of its partial results. Made and re-planned by `crate::plan`, read by both backends.

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaStream;

use crate::consts::HEAD_DIM_V;
use crate::device::Device;
use crate::error::Result;
use crate::gpu::{DeviceBuffer, GpuDevice};
use crate::step::options::InvariantChunks;
use crate::tensor::Tensor;

/// Scheduling metadata for one decode step, plus (on the GPU) the workspace for partial
/// results of split sequences. Reuse it for every layer of the step, and re-plan it in place
/// (`Plan::replan`, in `crate::plan`) when the lengths change: no allocation, on CUDA one kernel.
///
/// Decodes that share a plan never overwrite each other's partial results: on one stream
/// they run in stream order, and a decode (or replan) on another stream first waits for the
/// plan's work on the stream it was last used on.
pub struct Plan {
    pub batch: usize,
    /// Query rows per sequence and KV head (s_q * h_q / h_kv) this plan was made for.
    pub rows: usize,
    pub num_parts: usize,
    /// Partial-result slots of the workspace: b + num_parts (default), b * max_chunks
    /// (batch-invariant).
    pub slots: usize,
    /// The chunk rule of a batch-invariant plan (None: the default plan); kept by replans.
    pub(crate) chunks: Option<InvariantChunks>,
    /// [num_parts, 8] int32.
    pub(crate) metadata: Tensor,
    /// [b + 1] int32.
    pub(crate) num_splits: Tensor,
    /// GPU only: the workspace ([`WorkspaceLayout`]). Kept in order by `last_stream`.
    pub(crate) workspace: Option<DeviceBuffer>,
    /// CUDA: the stream the plan's work was last queued on.
    pub(crate) last_stream: Mutex<Option<Arc<CudaStream>>>,
}

impl Plan {
    pub fn device(&self) -> &Device {
        self.metadata.device()
    }
    /// The scheduling metadata, [num_parts, 8] int32 (FlashMLA's tile_scheduler_metadata).
    pub fn metadata(&self) -> &Tensor {
        &self.metadata
    }
    /// Exclusive prefix sum of splits per sequence, [b + 1] int32.
    pub fn num_splits(&self) -> &Tensor {
        &self.num_splits
    }
    /// Whether this is a batch-invariant plan (see `crate::plan`).
    pub fn batch_invariant(&self) -> bool {
        self.chunks.is_some()
    }
    /// The chunk rule of a batch-invariant plan.
    pub fn chunks(&self) -> Option<InvariantChunks> {
        self.chunks
    }

    /// The workspace's layout (CUDA plans).
    pub fn workspace_layout(&self) -> WorkspaceLayout {
        WorkspaceLayout::new(self.batch, self.slots, self.rows)
    }

    /// Orders the plan's use on `stream` after its earlier work on another stream.
    pub(crate) fn order_on(&self, g: &GpuDevice, stream: &Arc<CudaStream>, capturing: bool) -> Result<()> {
        let mut last = self.last_stream.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(prev) = last.as_ref() {
            if prev.cu_stream() != stream.cu_stream() && !capturing {
                let ev = g.mem().event()?;
                ev.record(prev)?;
                stream.wait(&ev)?;
                g.mem().recycle(ev);
            }
        }
        if !capturing {
            *last = Some(stream.clone());
        }
        Ok(())
    }
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inv = if self.batch_invariant() { ", batch-invariant" } else { "" };
        write!(f, "Plan(b = {}, rows = {}, parts = {}{inv}, {})", self.batch, self.rows, self.num_parts, self.device().kind())
    }
}

/// Where the parts of a CUDA plan's workspace sit, in bytes from its start: partial
/// outputs `[slots, rows, 512]` f32, their lse `[slots, rows]` f32, then the lengths the
/// plan was made for `[b]` i32 (the combine kernel compares them with the step's). The one
/// statement of the layout: the plan allocates [`WorkspaceLayout::bytes`], the launches
/// take the offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceLayout {
    /// Partial outputs (`oaccum`).
    pub oaccum: usize,
    /// Partial lse (`lseaccum`).
    pub lseaccum: usize,
    /// The plan's copy of its lengths (`plan_seqlens`).
    pub plan_seqlens: usize,
    /// The whole workspace.
    pub bytes: usize,
}

impl WorkspaceLayout {
    pub fn new(b: usize, slots: usize, rows: usize) -> WorkspaceLayout {
        let lseaccum = slots * rows * HEAD_DIM_V * 4;
        let plan_seqlens = lseaccum + slots * rows * 4;
        WorkspaceLayout { oaccum: 0, lseaccum, plan_seqlens, bytes: plan_seqlens + b * 4 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_layout_is_partials_then_lse_then_lengths() {
        let l = WorkspaceLayout::new(3, 7, 16);
        assert_eq!((l.oaccum, l.lseaccum, l.plan_seqlens), (0, 7 * 16 * 512 * 4, 7 * 16 * 513 * 4));
        assert_eq!(l.bytes, 7 * 16 * 513 * 4 + 3 * 4);
    }
}
