//! Making and re-planning plans (FlashMLA's `get_mla_metadata`) on either device: the
//! front of the scheduler. The scheduler itself is `step::sched` (on the host) and
//! `kernels/common/mla_plan.cu` (on the device); the plan type is `step::plan`. Re-exported
//! here: the paths of the crate's API.
//!
//! Every sequence's blocks are divided among `num_parts` workers (SM parts on the GPU,
//! threads on the CPU) so that each gets about the same cost, where a segment of `n`
//! blocks costs `n + SPLIT_FIXED_COST` (the fixed cost of a split: loading q, writing a
//! partial result, merging it). A sequence cut into several segments is merged by the
//! combine pass. The result depends only on `cache_seqlens` and the part count, and the
//! GPU kernel (`kernels/common/plan/mla_plan.cu`) computes exactly [`host_plan`] on the device.
//!
//! Layout (int32): `metadata[num_parts][8]`, one [`SchedMeta`] row per part;
//! `num_splits[b + 1]` = exclusive prefix sum of splits per sequence.
//!
//! # Batch-invariant plans
//!
//! The default plan cuts a sequence where the other sequences' lengths put the part
//! boundaries, so the order of a sequence's floating-point reductions (and with it the
//! low bits of its output) depends on the batch. A batch-invariant plan
//! ([`PlanOptions::batch_invariant`], [`host_plan_invariant`]) cuts every sequence into
//! chunks that depend on its own length only ([`InvariantChunks`]): each chunk is its own
//! split with its own partial slot, the decode kernels give every chunk its own
//! online-softmax state (even when one part holds several chunks of a sequence), and the
//! combine merges a sequence's chunks in chunk order. Parts are still balanced by cost, at
//! chunk granularity.
//!
//! Then a sequence's `out` and `lse` are a function of its own queries, cache rows and
//! length only: bit for bit the same whatever else is in the batch, wherever the sequence
//! sits in it and wherever its blocks sit in the pool, on one backend, device kind, build
//! (and `MLA_*` tuning environment), dtype and h_q / s_q / causal / softmax scale. They are
//! not the same across the CPU and CUDA backends, across CUDA kernels
//! (`MLA_DECODE_KERNEL`), across CPU inner-loop builds, across versions that change a
//! kernel, or between an invariant and a default plan.

use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use cudarc::driver::CudaStream;

use crate::device::{Device, StepId};
use crate::dtype::DType;
use crate::error::{ErrorCode, MlaError, Result};
use crate::tensor::Tensor;

pub use crate::step::options::{InvariantChunks, PlanOptions, INVARIANT_CHUNK_BLOCKS, INVARIANT_MAX_CHUNKS};
pub use crate::step::plan::{Plan, WorkspaceLayout};
pub use crate::step::sched::{host_plan, host_plan_for, host_plan_invariant, num_parts_for, slots_for, split_fixed_cost, SchedMeta, GPU_ROW_TILE, META_INTS};

// Defined here, not in `step::plan`: re-planning dispatches to the devices.
impl Plan {
    /// Re-plans in place for new lengths (same batch size): the metadata tensors and the
    /// workspace keep their memory. On CUDA one plan kernel is enqueued as a step (a length
    /// out of range is reported by the next synchronising call); on the CPU the schedule is
    /// recomputed now. Equals a fresh [`plan_with`] for `seqlens` with this plan's options
    /// (a batch-invariant plan stays one, with its chunk rule).
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
/// device's next `synchronize()`. The default schedule; see [`plan_with`] for a
/// batch-invariant one.
pub fn plan(seqlens: &Tensor, rows: usize, h_kv: usize) -> Result<Plan> {
    plan_with(seqlens, rows, h_kv, &PlanOptions::default())
}

/// [`plan`] with options: `opts.batch_invariant` makes a plan whose split points depend
/// on each sequence's own length only (see the module docs). [`Plan::replan`] keeps the
/// options.
///
/// ```
/// use mla_core::plan::{plan_with, PlanOptions};
/// use mla_core::{Device, Tensor};
/// let dev = Device::cpu();
/// let p = plan_with(&Tensor::from_i32(&dev, &[100, 14000], &[2])?, 16, 1, &PlanOptions::invariant())?;
/// assert!(p.batch_invariant());
/// // 14000 tokens = 219 blocks: 4 chunks of 54 or 55 blocks, whatever the batch holds.
/// assert_eq!(p.num_splits().to_i32()?, [0, 1, 5]);
/// # Ok::<(), mla_core::MlaError>(())
/// ```
pub fn plan_with(seqlens: &Tensor, rows: usize, h_kv: usize, opts: &PlanOptions) -> Result<Plan> {
    check_seqlens(seqlens)?;
    if h_kv != 1 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "h_kv", 1, h_kv));
    }
    if rows == 0 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "rows (s_q * h_q / h_kv)", "at least 1", rows));
    }
    let chunks = opts.chunk_rule();
    if let Some(c) = chunks {
        c.validate()?;
    }
    let b = seqlens.shape()[0];
    let device = seqlens.device().clone();
    let num_parts = num_parts_for(&device, rows);
    let slots = slots_for(b, num_parts, chunks);
    if slots > i32::MAX as usize {
        let what = "a batch whose partial slots (b + parts, or b * max_chunks when batch-invariant) fit in int32";
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "cache_seqlens", what, format!("b = {b}")));
    }
    match &device {
        Device::Cpu => {
            let (meta, splits) = host_plan_for(seqlens.host().unwrap().as_i32(), num_parts, chunks);
            Ok(Plan {
                batch: b,
                rows,
                num_parts,
                slots,
                chunks,
                metadata: Tensor::from_i32(&device, &meta, &[num_parts, META_INTS])?,
                num_splits: Tensor::from_i32(&device, &splits, &[b + 1])?,
                workspace: None,
                last_stream: Mutex::new(None),
            })
        }
        Device::Cuda(g) => {
            let metadata = Tensor::zeros(&device, &[num_parts, META_INTS], DType::I32)?;
            let num_splits = Tensor::zeros(&device, &[b + 1], DType::I32)?;
            let workspace = g.alloc_zeroed(WorkspaceLayout::new(b, slots, rows).bytes)?;
            let mut p = Plan {
                batch: b,
                rows,
                num_parts,
                slots,
                chunks,
                metadata,
                num_splits,
                workspace: Some(workspace),
                last_stream: Mutex::new(Some(g.stream().clone())),
            };
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
            let (meta, splits) = host_plan_for(seqlens.host().unwrap().as_i32(), plan.num_parts, plan.chunks);
            let (id, ()) = Device::Cpu.step("replan", || {
                plan.metadata.write_bytes(0, crate::host::as_bytes(&meta))?;
                plan.num_splits.write_bytes(0, crate::host::as_bytes(&splits))
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
