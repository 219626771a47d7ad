//! Split-KV scheduling metadata (FlashMLA's `get_mla_metadata`).
//!
//! Every sequence's blocks are divided among `num_parts` workers (SM parts on the GPU,
//! threads on the CPU) so that each gets about the same cost, where a segment of `n`
//! blocks costs `n + SPLIT_FIXED_COST` (the fixed cost of a split: loading q, writing a
//! partial result, merging it). A sequence cut into several segments is merged by the
//! combine pass. The result depends only on `cache_seqlens` and the part count, and the
//! GPU kernel (`kernels/common/mla_plan.cu`) computes exactly [`host_plan`] on the device.
//!
//! Layout (int32): `metadata[num_parts][8]` = begin_seq, begin_block, end_seq, end_block
//! (exclusive, within end_seq), the split index within begin_seq of the part's first
//! segment, then zeros; `num_splits[b + 1]` = exclusive prefix sum of splits per sequence.

use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use cudarc::driver::CudaStream;

use crate::device::{Device, StepId};
use crate::dtype::DType;
use crate::error::{ErrorCode, MlaError, Result};
use crate::gpu::{DeviceBuffer, GpuDevice};
use crate::tensor::Tensor;
use crate::{BLOCK_SIZE, HEAD_DIM_V, SPLIT_FIXED_COST};

/// The split cost the scheduler uses: SPLIT_FIXED_COST, or MLA_SPLIT_FIXED_COST when set
/// (read once; for tuning experiments).
pub fn split_fixed_cost() -> usize {
    static COST: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COST.get_or_init(|| std::env::var("MLA_SPLIT_FIXED_COST").ok().and_then(|v| v.parse().ok()).unwrap_or(SPLIT_FIXED_COST))
}

pub const META_INTS: usize = 8;
/// Query rows one GPU thread block handles.
pub const GPU_ROW_TILE: usize = 64;

/// Scheduling metadata for one decode step, plus (on the GPU) the workspace for partial
/// results of split sequences. Reuse it for every layer of the step, and re-plan it in place
/// ([`Plan::replan`]) when the lengths change: no allocation, on CUDA one kernel.
///
/// Decodes that share a plan never overwrite each other's partial results: on one stream
/// they run in stream order, and a decode (or replan) on another stream first waits for the
/// plan's work on the stream it was last used on.
pub struct Plan {
    pub batch: usize,
    /// Query rows per sequence and KV head (s_q * h_q / h_kv) this plan was made for.
    pub rows: usize,
    pub num_parts: usize,
    /// [num_parts, 8] int32.
    pub(crate) metadata: Tensor,
    /// [b + 1] int32.
    pub(crate) num_splits: Tensor,
    /// GPU only: partial outputs [b + num_parts, rows, 512] f32, lse [b + num_parts, rows]
    /// f32, then the lengths the plan was made for [b] i32 (the combine kernel compares
    /// them with the step's). Kept in order by `last_stream`.
    pub(crate) workspace: Option<DeviceBuffer>,
    /// CUDA: the stream the plan's work was last queued on.
    last_stream: Mutex<Option<Arc<CudaStream>>>,
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

    /// Re-plans in place for new lengths (same batch size): the metadata tensors and the
    /// workspace keep their memory. On CUDA one plan kernel is enqueued as a step (a length
    /// out of range is reported by the next synchronising call); on the CPU the schedule is
    /// recomputed now. Equals a fresh [`plan`] for `seqlens`.
    ///
    /// ```
    /// use mla_core::{plan, Device, Tensor};
    /// let dev = Device::cpu();
    /// let mut p = plan(&Tensor::from_i32(&dev, &[100, 7000], &[2])?, 16, 1)?;
    /// let grown = Tensor::from_i32(&dev, &[101, 7001], &[2])?;
    /// p.replan(&grown)?;
    /// assert_eq!(p.metadata().to_i32()?, plan(&grown, 16, 1)?.metadata().to_i32()?);
    /// # Ok::<(), mla_core::MlaError>(())
    /// ```
    pub fn replan(&mut self, seqlens: &Tensor) -> Result<StepId> {
        replan_step(seqlens, self, None)
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
        write!(f, "Plan(b = {}, rows = {}, parts = {}, {})", self.batch, self.rows, self.num_parts, self.device().kind())
    }
}

/// A plan shared between threads and handles (the Node binding's `Plan`): decodes read it
/// under a shared lock (on CUDA only while enqueueing; the CPU backend while it computes),
/// [`SharedPlan::replan`] takes it exclusively. The decode-ordering rules are the plan's own
/// (see [`Plan`]), so no decode lock is needed.
pub struct SharedPlan {
    plan: RwLock<Plan>,
}

impl SharedPlan {
    pub fn new(plan: Plan) -> SharedPlan {
        SharedPlan { plan: RwLock::new(plan) }
    }
    /// The plan, for a decode or to read its metadata.
    pub fn read(&self) -> RwLockReadGuard<'_, Plan> {
        self.plan.read().unwrap_or_else(|e| e.into_inner())
    }
    /// [`Plan::replan`].
    pub fn replan(&self, seqlens: &Tensor) -> Result<StepId> {
        self.plan.write().unwrap_or_else(|e| e.into_inner()).replan(seqlens)
    }
}

/// Bytes of a CUDA plan's workspace (see [`Plan`]'s `workspace`).
pub(crate) fn workspace_bytes(b: usize, num_parts: usize, rows: usize) -> usize {
    (b + num_parts) * rows * (HEAD_DIM_V + 1) * 4 + b * 4
}

/// How many parts the device splits the work into.
pub fn num_parts_for(device: &Device, rows: usize) -> usize {
    match device {
        Device::Cpu => rayon::current_num_threads().max(1),
        Device::Cuda(g) => (g.info().multiprocessors / rows.div_ceil(GPU_ROW_TILE).max(1)).max(1),
    }
}

/// The scheduler, on the host. Returns (metadata, num_splits). Lengths outside
/// [0, max_seqlen] must have been rejected before.
pub fn host_plan(seqlens: &[i32], num_parts: usize) -> (Vec<i32>, Vec<i32>) {
    let b = seqlens.len();
    let fixed = split_fixed_cost() as i64;
    let nb: Vec<i64> = seqlens.iter().map(|&l| (l.max(0) as i64 + BLOCK_SIZE as i64 - 1) / BLOCK_SIZE as i64).collect();
    let total: i64 = nb.iter().map(|&n| if n > 0 { n + fixed } else { 0 }).sum();
    // Each part wastes at most `fixed` units at its end, so this covers all the work.
    let payload = ((total + num_parts as i64 - 1) / num_parts as i64).max(1) + fixed;
    let mut meta = vec![0i32; num_parts * META_INTS];
    let mut num_splits = vec![0i32; b + 1];
    let (mut seq, mut blk, mut splits_in_seq) = (0usize, 0i64, 0i32);
    for p in 0..num_parts {
        let m = &mut meta[p * META_INTS..(p + 1) * META_INTS];
        m[0] = seq as i32;
        m[1] = blk as i32;
        m[4] = splits_in_seq;
        let mut remain = payload;
        while seq < b {
            let left = nb[seq] - blk;
            if left > 0 {
                if remain <= fixed {
                    break;
                }
                let take = left.min(remain - fixed);
                remain -= take + fixed;
                blk += take;
                splits_in_seq += 1;
                if blk < nb[seq] {
                    break; // this part is full in the middle of the sequence
                }
            }
            num_splits[seq + 1] = num_splits[seq] + splits_in_seq;
            seq += 1;
            blk = 0;
            splits_in_seq = 0;
        }
        m[2] = seq as i32;
        m[3] = blk as i32;
    }
    debug_assert_eq!(seq, b, "the plan must cover every sequence");
    (meta, num_splits)
}

/// int32 [b]; on the CPU backend also no negative length (on CUDA the kernel checks).
fn check_seqlens(seqlens: &Tensor) -> Result<()> {
    if seqlens.dtype() != DType::I32 {
        return Err(MlaError::arg(ErrorCode::DtypeMismatch, "cache_seqlens", "int32", seqlens.dtype()));
    }
    if seqlens.shape().len() != 1 {
        return Err(MlaError::arg(ErrorCode::ShapeMismatch, "cache_seqlens", "shape [b]", format!("{:?}", seqlens.shape())));
    }
    if let Some(h) = seqlens.host() {
        if let Some((i, &l)) = h.as_i32().iter().enumerate().find(|(_, &l)| l < 0) {
            return Err(MlaError::arg(ErrorCode::SeqlenOutOfRange, &format!("cache_seqlens[{i}]"), ">= 0", l));
        }
    }
    Ok(())
}

/// Computes the plan for `seqlens` ([b] int32) on the device that holds it, for
/// `rows` = s_q * h_q / h_kv query rows per KV head. On CUDA this is a kernel reading the
/// device-resident lengths (no host synchronisation); a bad length is reported by the
/// device's next `synchronize()`.
pub fn plan(seqlens: &Tensor, rows: usize, h_kv: usize) -> Result<Plan> {
    check_seqlens(seqlens)?;
    if h_kv != 1 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "h_kv", 1, h_kv));
    }
    if rows == 0 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "rows (s_q * h_q / h_kv)", "at least 1", rows));
    }
    let b = seqlens.shape()[0];
    let device = seqlens.device().clone();
    let num_parts = num_parts_for(&device, rows);
    match &device {
        Device::Cpu => {
            let (meta, splits) = host_plan(seqlens.host().unwrap().as_i32(), num_parts);
            Ok(Plan {
                batch: b,
                rows,
                num_parts,
                metadata: Tensor::from_i32(&device, &meta, &[num_parts, META_INTS])?,
                num_splits: Tensor::from_i32(&device, &splits, &[b + 1])?,
                workspace: None,
                last_stream: Mutex::new(None),
            })
        }
        Device::Cuda(g) => {
            let metadata = Tensor::zeros(&device, &[num_parts, META_INTS], DType::I32)?;
            let num_splits = Tensor::zeros(&device, &[b + 1], DType::I32)?;
            let workspace = g.alloc_zeroed(workspace_bytes(b, num_parts, rows))?;
            let mut p = Plan { batch: b, rows, num_parts, metadata, num_splits, workspace: Some(workspace), last_stream: Mutex::new(Some(g.stream().clone())) };
            g.step("plan", &g.stream().clone(), || crate::gpu::ops::plan_into(g, seqlens, &mut p, None, i32::MAX))?;
            Ok(p)
        }
    }
}

/// Recomputes `plan` in place from new lengths (same batch size and rows): on CUDA this
/// enqueues the plan kernel only (as a step), so it can also be captured in a CUDA graph
/// and replayed. See [`Plan::replan`].
pub fn replan(seqlens: &Tensor, plan: &mut Plan) -> Result<()> {
    replan_step(seqlens, plan, None).map(|_| ())
}

/// [`replan`] on a given CUDA stream (None: the device's own stream).
pub fn replan_on(seqlens: &Tensor, plan: &mut Plan, stream: Option<std::sync::Arc<cudarc::driver::CudaStream>>) -> Result<()> {
    replan_step(seqlens, plan, stream).map(|_| ())
}

fn replan_step(seqlens: &Tensor, plan: &mut Plan, stream: Option<Arc<CudaStream>>) -> Result<StepId> {
    check_seqlens(seqlens)?;
    if !seqlens.device().same(plan.device()) {
        return Err(MlaError::arg(ErrorCode::DeviceMismatch, "cache_seqlens", format!("{:?}", plan.device()), format!("{:?}", seqlens.device())));
    }
    if seqlens.shape() != [plan.batch] {
        return Err(MlaError::arg(ErrorCode::ShapeMismatch, "cache_seqlens", format!("[{}]", plan.batch), format!("{:?}", seqlens.shape())));
    }
    match seqlens.device() {
        Device::Cpu => {
            let (meta, splits) = host_plan(seqlens.host().unwrap().as_i32(), plan.num_parts);
            let (id, ()) = Device::Cpu.step("replan", || {
                plan.metadata.write_bytes(0, crate::tensor::as_bytes(&meta))?;
                plan.num_splits.write_bytes(0, crate::tensor::as_bytes(&splits))
            })?;
            Ok(id)
        }
        Device::Cuda(g) => {
            let s = stream.clone().unwrap_or_else(|| g.stream().clone());
            let capturing = g.prepare_stream(&s)?;
            plan.order_on(g, &s, capturing)?;
            if capturing {
                crate::gpu::ops::plan_into(g, seqlens, plan, stream, i32::MAX)?;
                return Ok(g.current_step().unwrap_or(0));
            }
            let (id, ()) = g.step("replan", &s, || crate::gpu::ops::plan_into(g, seqlens, plan, stream, i32::MAX))?;
            Ok(id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(seqlens: &[i32], parts: usize) {
        let (meta, splits) = host_plan(seqlens, parts);
        let mut seen = vec![0i64; seqlens.len()];
        let mut seg_count = vec![0i32; seqlens.len()];
        for p in 0..parts {
            let m = &meta[p * META_INTS..];
            let (bs, bb, es, eb) = (m[0] as usize, m[1] as i64, m[2] as usize, m[3] as i64);
            for s in bs..=es.min(seqlens.len() - 1) {
                let nb = (seqlens[s] as i64 + 63) / 64;
                let lo = if s == bs { bb } else { 0 };
                let hi = if s == es { eb } else { nb };
                if hi > lo {
                    let local = if s == bs { m[4] } else { 0 };
                    assert_eq!(local, seg_count[s], "split index of seq {s} in part {p}");
                    seg_count[s] += 1;
                    seen[s] += hi - lo;
                }
            }
        }
        for (s, &l) in seqlens.iter().enumerate() {
            assert_eq!(seen[s], (l as i64 + 63) / 64, "blocks of seq {s}");
            assert_eq!(splits[s + 1] - splits[s], seg_count[s], "num_splits of seq {s}");
        }
    }

    #[test]
    fn every_block_is_assigned_once() {
        covered(&[4096; 128], 132);
        covered(&[1, 63, 64, 65, 140, 0, 0, 4096], 132);
        covered(&[4641, 45118, 1730, 1696], 132);
        covered(&[0, 0, 0], 7);
        covered(&[100, 0, 3000, 1, 0], 2);
        covered(&[70000], 1);
        for parts in [1, 2, 3, 16, 33, 66, 132] {
            covered(&[4096, 0, 8192, 64, 65, 1, 16384, 5000], parts);
        }
    }

    #[test]
    fn short_sequences_are_not_split() {
        let (_, splits) = host_plan(&[64; 128], 132);
        for s in 0..128 {
            assert_eq!(splits[s + 1] - splits[s], 1);
        }
    }
}
