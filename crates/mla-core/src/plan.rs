//! Split-KV scheduling metadata (FlashMLA's `get_mla_metadata`).
//!
//! Every sequence's blocks are divided among `num_parts` workers (SM parts on the GPU,
//! threads on the CPU) so that each gets about the same cost, where a segment of `n`
//! blocks costs `n + SPLIT_FIXED_COST` (the fixed cost of a split: loading q, writing a
//! partial result, merging it). A sequence cut into several segments is merged by the
//! combine pass. The result depends only on `cache_seqlens` and the part count, and the
//! GPU kernel (`kernels/common/plan/mla_plan.cu`) computes exactly [`host_plan`] on the device.
//!
//! Layout (int32): `metadata[num_parts][8]` = begin_seq, begin_block, end_seq, end_block
//! (exclusive, within end_seq), the split index within begin_seq of the part's first
//! segment, then zeros; `num_splits[b + 1]` = exclusive prefix sum of splits per sequence.
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
use crate::gpu::{DeviceBuffer, GpuDevice};
use crate::tensor::Tensor;
use crate::consts::{BLOCK_SIZE, HEAD_DIM_V, SPLIT_FIXED_COST};

/// The split cost the scheduler uses: SPLIT_FIXED_COST, or MLA_SPLIT_FIXED_COST when set
/// (read once; for tuning experiments).
pub fn split_fixed_cost() -> usize {
    static COST: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COST.get_or_init(|| std::env::var("MLA_SPLIT_FIXED_COST").ok().and_then(|v| v.parse().ok()).unwrap_or(SPLIT_FIXED_COST))
}

pub const META_INTS: usize = 8;

/// Blocks per chunk of a batch-invariant plan (4096 tokens: 64 measured 1.09x the default
/// plan's time on the H200 grid, 32 1.13x, 128 1.10x; BENCHMARKS.md), before [`INVARIANT_MAX_CHUNKS`]
/// makes chunks longer.
pub const INVARIANT_CHUNK_BLOCKS: usize = 64;
/// Chunks per sequence of a batch-invariant plan at most: bounds the plan's partial slots
/// (b * 8) whatever the lengths, so a CUDA plan can be re-planned on the device for any
/// lengths without growing its workspace.
pub const INVARIANT_MAX_CHUNKS: usize = 8;

/// How a batch-invariant plan cuts a sequence of `nb` blocks: into
/// `n = min(max_chunks, ceil(nb / chunk_blocks))` chunks of nearly equal size, chunk `k`
/// being blocks `[k * nb / n, (k + 1) * nb / n)` (rounded down): a function of `nb` alone.
/// With the standard rule (64, 8) a sequence of up to 32768 tokens gets chunks of 33 to 64
/// blocks, a longer one 8 chunks of nb / 8 blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvariantChunks {
    pub chunk_blocks: usize,
    pub max_chunks: usize,
}

impl Default for InvariantChunks {
    fn default() -> InvariantChunks {
        InvariantChunks::standard()
    }
}

impl InvariantChunks {
    /// The rule of this build: [`INVARIANT_CHUNK_BLOCKS`], [`INVARIANT_MAX_CHUNKS`], or
    /// MLA_INVARIANT_CHUNK_BLOCKS / MLA_INVARIANT_MAX_CHUNKS when set (read once; for
    /// tuning experiments: outputs are invariant for one rule only).
    pub fn standard() -> InvariantChunks {
        static RULE: std::sync::OnceLock<InvariantChunks> = std::sync::OnceLock::new();
        *RULE.get_or_init(|| {
            let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).filter(|&v| v > 0).unwrap_or(d);
            InvariantChunks {
                chunk_blocks: env("MLA_INVARIANT_CHUNK_BLOCKS", INVARIANT_CHUNK_BLOCKS),
                max_chunks: env("MLA_INVARIANT_MAX_CHUNKS", INVARIANT_MAX_CHUNKS),
            }
        })
    }

    /// Chunks of a sequence of `nb` blocks (0 for an empty one).
    pub fn chunks(&self, nb: usize) -> usize {
        nb.div_ceil(self.chunk_blocks).min(self.max_chunks)
    }

    /// First block of chunk `k` of `n` of a sequence of `nb` blocks (`nb` for k = n).
    pub fn chunk_start(k: usize, nb: usize, n: usize) -> usize {
        (k as u64 * nb as u64 / n as u64) as usize
    }

    /// The chunk (of `n`) that holds block `x` of a sequence of `nb` blocks.
    pub fn chunk_of_block(x: usize, nb: usize, n: usize) -> usize {
        (((x as u64 + 1) * n as u64 - 1) / nb as u64) as usize
    }

    /// Both in [1, 2^20] (what the kernels' int32 arithmetic is checked for).
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("chunk_blocks", self.chunk_blocks), ("max_chunks", self.max_chunks)] {
            if v == 0 || v > 1 << 20 {
                return Err(MlaError::arg(ErrorCode::InvalidArgument, &format!("invariant chunks: {name}"), "within [1, 1048576]", v));
            }
        }
        Ok(())
    }
}

/// How [`plan_with`] schedules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Split points that depend on each sequence's own length only, so that a sequence's
    /// output is bit for bit the same whatever else is in the batch (see the module docs
    /// for what is and is not guaranteed). Default false: FlashMLA's schedule.
    pub batch_invariant: bool,
    /// The chunk rule of a batch-invariant plan (None: [`InvariantChunks::standard`]).
    pub chunks: Option<InvariantChunks>,
}

impl PlanOptions {
    /// A batch-invariant plan with the standard chunks.
    pub fn invariant() -> PlanOptions {
        PlanOptions { batch_invariant: true, chunks: None }
    }
    /// The chunk rule these options give (None: the default plan).
    pub fn chunk_rule(&self) -> Option<InvariantChunks> {
        self.batch_invariant.then(|| self.chunks.unwrap_or_else(InvariantChunks::standard))
    }
}
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
    /// Partial-result slots of the workspace: b + num_parts (default), b * max_chunks
    /// (batch-invariant).
    pub slots: usize,
    /// The chunk rule of a batch-invariant plan (None: the default plan); kept by replans.
    pub(crate) chunks: Option<InvariantChunks>,
    /// [num_parts, 8] int32.
    pub(crate) metadata: Tensor,
    /// [b + 1] int32.
    pub(crate) num_splits: Tensor,
    /// GPU only: partial outputs [slots, rows, 512] f32, lse [slots, rows] f32, then the lengths the plan was made for [b] i32 (the combine kernel compares
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
    /// Whether this is a batch-invariant plan (see the module docs).
    pub fn batch_invariant(&self) -> bool {
        self.chunks.is_some()
    }
    /// The chunk rule of a batch-invariant plan.
    pub fn chunks(&self) -> Option<InvariantChunks> {
        self.chunks
    }

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
pub(crate) fn workspace_bytes(b: usize, slots: usize, rows: usize) -> usize {
    slots * rows * (HEAD_DIM_V + 1) * 4 + b * 4
}

/// Partial slots a plan needs for any lengths: the default plan makes at most one split
/// more per part than sequences; an invariant one at most max_chunks per sequence.
pub fn slots_for(b: usize, num_parts: usize, chunks: Option<InvariantChunks>) -> usize {
    match chunks {
        None => b + num_parts,
        Some(c) => b * c.max_chunks,
    }
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

/// [`host_plan`] or, with a chunk rule, [`host_plan_invariant`].
pub fn host_plan_for(seqlens: &[i32], num_parts: usize, chunks: Option<InvariantChunks>) -> (Vec<i32>, Vec<i32>) {
    match chunks {
        None => host_plan(seqlens, num_parts),
        Some(c) => host_plan_invariant(seqlens, num_parts, c),
    }
}

/// A sequence's blocks, chunks and cost (blocks + chunks * fixed) in an invariant plan.
fn seq_chunks(len: i32, c: InvariantChunks, fixed: i64) -> (i64, i64, i64) {
    let nb = (len.max(0) as i64 + BLOCK_SIZE as i64 - 1) / BLOCK_SIZE as i64;
    let n = c.chunks(nb as usize) as i64;
    (nb, n, nb + n * fixed)
}

/// The greedy walk of an invariant plan with part cost cap `cap`: each part takes whole
/// chunks, in order, while their cost (blocks + fixed each) stays within `cap`. Returns
/// whether `num_parts` parts cover every chunk. With `meta`, writes every part's row and
/// makes the last part take whatever is left (so the plan always covers the batch).
/// `mla_plan.cu` walks exactly the same way.
fn invariant_walk(nb: &[i64], n: &[i64], num_parts: usize, cap: i64, fixed: i64, mut meta: Option<&mut [i32]>) -> bool {
    let b = nb.len();
    let cost = |s: usize| nb[s] + n[s] * fixed;
    // Cost of the chunks of s before chunk k.
    let before = |s: usize, k: i64| if k == 0 { 0 } else { k * nb[s] / n[s] + k * fixed };
    let start_blk = |s: usize, k: i64| if s < b { (k * nb[s] / n[s].max(1)) as i32 } else { 0 };
    let (mut s, mut k, mut q) = (0usize, 0i64, 0i64); // position: chunk k of s; q = cost before s
    for p in 0..num_parts {
        let (bs, bk) = (s, k);
        if meta.is_some() && p + 1 == num_parts {
            (s, k) = (b, 0);
        } else if s < b {
            let lim = q + before(s, k) + cap;
            while s < b && q + cost(s) <= lim {
                q += cost(s);
                s += 1;
                k = 0;
            }
            if s < b {
                // The last chunk boundary within lim: k0 or k0 + 1 (before(k) <= k * unit / n).
                let (r, unit) = (lim - q, nb[s] + n[s] * fixed);
                k = (r * n[s] / unit).min(n[s] - 1);
                if k + 1 < n[s] && before(s, k + 1) <= r {
                    k += 1;
                }
            }
        }
        if let Some(m) = meta.as_deref_mut() {
            let m = &mut m[p * META_INTS..(p + 1) * META_INTS];
            m.copy_from_slice(&[bs as i32, start_blk(bs, bk), s as i32, start_blk(s, k), bk as i32, 0, 0, 0]);
        }
    }
    s == b
}

/// The batch-invariant scheduler, on the host (see the module docs): every sequence is cut
/// into the chunks `c` gives its own length, each chunk is a split, and the parts are the
/// contiguous runs of whole chunks that minimise the largest part cost (the smallest cap
/// for which [`invariant_walk`] covers the batch, found by bisection; the device finds the
/// same cap by a parallel search). Returns (metadata, num_splits) in [`host_plan`]'s
/// layout; `num_splits` depends on each sequence's own length only.
pub fn host_plan_invariant(seqlens: &[i32], num_parts: usize, c: InvariantChunks) -> (Vec<i32>, Vec<i32>) {
    let fixed = split_fixed_cost() as i64;
    let b = seqlens.len();
    let (mut nb, mut n) = (Vec::with_capacity(b), Vec::with_capacity(b));
    let mut num_splits = vec![0i32; b + 1];
    let (mut total, mut max_cost) = (0i64, 0i64);
    for (i, &l) in seqlens.iter().enumerate() {
        let (blocks, chunks, cost) = seq_chunks(l, c, fixed);
        nb.push(blocks);
        n.push(chunks);
        num_splits[i + 1] = num_splits[i] + chunks as i32;
        total += cost;
        if chunks > 0 {
            max_cost = max_cost.max((blocks + chunks - 1) / chunks + fixed);
        }
    }
    let mut cap = 1;
    if total > 0 {
        let avg = (total + num_parts as i64 - 1) / num_parts as i64;
        // avg + max_cost always covers: a part that stops early holds more than avg.
        let (mut lo, mut hi) = (avg.max(max_cost), avg + max_cost);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if invariant_walk(&nb, &n, num_parts, mid, fixed, None) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        cap = lo;
    }
    let mut meta = vec![0i32; num_parts * META_INTS];
    invariant_walk(&nb, &n, num_parts, cap, fixed, Some(&mut meta));
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
            let workspace = g.alloc_zeroed(workspace_bytes(b, slots, rows))?;
            let mut p = Plan { batch: b, rows, num_parts, slots, chunks, metadata, num_splits, workspace: Some(workspace), last_stream: Mutex::new(Some(g.stream().clone())) };
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

    /// The chunks of each sequence that `meta` gives each part, checked against the rule:
    /// every chunk in exactly one part, whole. Returns the parts' costs.
    fn covered_invariant(seqlens: &[i32], parts: usize, c: InvariantChunks) -> Vec<i64> {
        let (meta, splits) = host_plan_invariant(seqlens, parts, c);
        let fixed = split_fixed_cost() as i64;
        let b = seqlens.len();
        let mut owner: Vec<Vec<Option<usize>>> = Vec::new();
        for (s, &l) in seqlens.iter().enumerate() {
            let nb = (l as usize).div_ceil(64);
            let n = c.chunks(nb);
            assert_eq!(splits[s + 1] - splits[s], n as i32, "num_splits of seq {s} (nb {nb})");
            owner.push(vec![None; n]);
        }
        let mut costs = vec![0i64; parts];
        for p in 0..parts {
            let m = &meta[p * META_INTS..(p + 1) * META_INTS];
            assert_eq!(&m[5..], &[0, 0, 0]);
            let (bs, bb, es, eb) = (m[0] as usize, m[1] as usize, m[2] as usize, m[3] as usize);
            assert!(bs <= es && es <= b, "part {p}: {m:?}");
            for s in bs..es.min(b.saturating_sub(1)) + 1 {
                if s >= b {
                    break;
                }
                let nb = (seqlens[s] as usize).div_ceil(64);
                let n = c.chunks(nb);
                let lo = if s == bs { bb } else { 0 };
                let hi = if s == es { eb } else { nb };
                if hi <= lo {
                    continue;
                }
                let k0 = InvariantChunks::chunk_of_block(lo, nb, n);
                assert_eq!(InvariantChunks::chunk_start(k0, nb, n), lo, "part {p} starts inside a chunk of seq {s}");
                if s == bs {
                    assert_eq!(m[4] as usize, k0, "split index of part {p}");
                }
                let k1 = InvariantChunks::chunk_of_block(hi - 1, nb, n);
                assert_eq!(InvariantChunks::chunk_start(k1 + 1, nb, n), hi, "part {p} ends inside a chunk of seq {s}");
                for k in k0..=k1 {
                    assert_eq!(owner[s][k], None, "chunk {k} of seq {s} in two parts");
                    owner[s][k] = Some(p);
                    costs[p] += (InvariantChunks::chunk_start(k + 1, nb, n) - InvariantChunks::chunk_start(k, nb, n)) as i64 + fixed;
                }
            }
        }
        for (s, o) in owner.iter().enumerate() {
            assert!(o.iter().all(|x| x.is_some()), "seq {s}: chunks without a part: {o:?}");
            assert!(o.windows(2).all(|w| w[0] <= w[1]), "seq {s}: parts out of order");
        }
        costs
    }

    /// The smallest possible largest part cost over contiguous runs of whole chunks
    /// (dynamic programming over chunk prefixes), for small batches.
    fn optimal_cap(seqlens: &[i32], parts: usize, c: InvariantChunks) -> i64 {
        let fixed = split_fixed_cost() as i64;
        let mut costs = Vec::new();
        for &l in seqlens {
            let nb = (l as usize).div_ceil(64);
            let n = c.chunks(nb);
            for k in 0..n {
                costs.push((InvariantChunks::chunk_start(k + 1, nb, n) - InvariantChunks::chunk_start(k, nb, n)) as i64 + fixed);
            }
        }
        let m = costs.len();
        let mut best = vec![vec![i64::MAX; m + 1]; parts + 1]; // best[p][i]: first i chunks in p parts
        best[0][0] = 0;
        for p in 1..=parts {
            for i in 0..=m {
                let mut run = 0;
                for j in (0..=i).rev() {
                    if j < i {
                        run += costs[j];
                    }
                    if best[p - 1][j] != i64::MAX {
                        best[p][i] = best[p][i].min(best[p - 1][j].max(run));
                    }
                }
            }
        }
        best[parts][m]
    }

    #[test]
    fn invariant_plans_cover_whole_chunks() {
        let std = InvariantChunks::standard();
        covered_invariant(&[4096; 128], 132, std);
        covered_invariant(&[1, 63, 64, 65, 140, 0, 0, 4096], 132, std);
        covered_invariant(&[0, 0, 0], 7, std);
        covered_invariant(&[70000, 0, 1], 1, std);
        covered_invariant(&[2_000_000_000], 5, std);
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = |n: u64| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for _ in 0..300 {
            let c = InvariantChunks { chunk_blocks: 1 + next(40) as usize, max_chunks: 1 + next(12) as usize };
            let b = 1 + next(60) as usize;
            let lens: Vec<i32> = (0..b).map(|_| if next(5) == 0 { 0 } else { next(30000) as i32 }).collect();
            let parts = 1 + next(140) as usize;
            covered_invariant(&lens, parts, c);
        }
    }

    #[test]
    fn invariant_plans_minimise_the_largest_part() {
        let mut x = 0x0ddc_0ffe_e15e_a5e5u64;
        let mut next = |n: u64| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for _ in 0..200 {
            let c = InvariantChunks { chunk_blocks: 1 + next(8) as usize, max_chunks: 1 + next(6) as usize };
            let b = 1 + next(8) as usize;
            let lens: Vec<i32> = (0..b).map(|_| if next(6) == 0 { 0 } else { next(1500) as i32 }).collect();
            let parts = 1 + next(9) as usize;
            let costs = covered_invariant(&lens, parts, c);
            let got = costs.iter().copied().max().unwrap();
            assert_eq!(got, optimal_cap(&lens, parts, c), "lens={lens:?} parts={parts} {c:?}: part costs {costs:?}");
        }
    }

    #[test]
    fn invariant_splits_depend_on_the_own_length_only() {
        // The chunks (split points) a sequence gets are the same alone and in any batch.
        let c = InvariantChunks::standard();
        for len in [1, 64, 4096, 4097, 7000, 32768, 32769, 100_000] {
            let alone = host_plan_invariant(&[len], 132, c).1;
            for batch in [vec![len, 5, 90000], vec![0, 3000, len], vec![len; 40]] {
                let pos = batch.iter().position(|&l| l == len).unwrap();
                let (_, splits) = host_plan_invariant(&batch, 7, c);
                assert_eq!(splits[pos + 1] - splits[pos], alone[1], "len {len} in {batch:?}");
            }
        }
        assert_eq!(c.chunks(1), 1);
        assert_eq!(c.chunks(INVARIANT_CHUNK_BLOCKS), 1);
        assert_eq!(c.chunks(INVARIANT_CHUNK_BLOCKS + 1), 2);
        assert_eq!(c.chunks(INVARIANT_CHUNK_BLOCKS * INVARIANT_MAX_CHUNKS), INVARIANT_MAX_CHUNKS);
        assert_eq!(c.chunks(100_000), INVARIANT_MAX_CHUNKS);
        assert_eq!((0..=4).map(|k| InvariantChunks::chunk_start(k, 110, 4)).collect::<Vec<_>>(), [0, 27, 55, 82, 110]);
    }

    #[test]
    fn short_sequences_are_not_split() {
        let (_, splits) = host_plan(&[64; 128], 132);
        for s in 0..128 {
            assert_eq!(splits[s + 1] - splits[s], 1);
        }
    }
}
