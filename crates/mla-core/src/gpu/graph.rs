//! CUDA-graph capture of decode steps: capture plan + decode + combine once, then replay
//! with new lengths written into the same device tensors (no host synchronisation).
//!
//! - [`capture`]: the raw form (capture whatever a closure enqueues on a stream).
//! - [`capture_step`] / [`CapturedStep`]: a whole decode step of L layers, owning the
//!   tensors it reads and writes, replayed as one step of the device's log (errors of a
//!   replay are reported by the next synchronising call, naming it). Also on the CPU
//!   backend, as eager replays with the same semantics.

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

// ---------------------------------------------------------------------------------------
// A whole decode step, captured once and replayed

use std::borrow::Cow;

use crate::consts::{BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V};
use crate::decode::{enqueue_into, DecodeOptions};
use crate::device::{Device, StepId};
use crate::dtype::DType;
use crate::plan::{plan_with, Plan, PlanOptions};
use crate::step::shape::DecodeInputs;
use crate::tensor::Tensor;
use crate::validate::{check_decode, check_outputs, check_scale, DecodeShape};

/// What [`capture_step`] captures: one decode step of `layers` layers over `batch`
/// sequences (block tables of `max_blocks_per_seq` entries), `s_q` query tokens and `h_q`
/// heads, in `dtype` (bf16 / fp16). Every layer reads its own cache pool (the `kv` tensors
/// given to [`capture_step`] and [`CapturedStep::replay`]); all layers share one block table
/// and one set of lengths, as they do when a model's layers allocate cache blocks alike.
#[derive(Clone, Debug)]
pub struct StepSpec {
    pub batch: usize,
    pub max_blocks_per_seq: usize,
    pub s_q: usize,
    pub h_q: usize,
    pub layers: usize,
    pub dtype: DType,
    pub causal: bool,
    pub softmax_scale: Option<f32>,
    /// The replays' label in error messages (default "graph step").
    pub label: Option<Cow<'static, str>>,
}

/// A CUDA graph exec handle (used by one thread at a time: `replay` takes `&mut`).
struct Graph(CudaGraph);
unsafe impl Send for Graph {}
unsafe impl Sync for Graph {}

/// A decode step of L layers (plan, then per layer decode and combine) captured once and
/// replayed with new contents in the same tensors: the step owns its queries, outputs,
/// block table and lengths (fixed device addresses the graph reads and writes), and a plan
/// that the graph itself re-plans from the lengths on every replay. Write the new lengths
/// (`KvCache::batch_into(seqs, step.block_table_mut(), step.seqlens_mut())`) and queries
/// (`step.q_mut(l)`, e.g. `copy_from` the model's output), then [`CapturedStep::replay`]:
/// one graph launch, no host synchronisation.
///
/// On the CPU backend the same object replays eagerly (plan + L decodes, same semantics).
///
/// ```
/// use mla_core::gpu::graph::{capture_step, StepSpec};
/// use mla_core::{DType, Device, KvCache, KvCacheConfig};
/// let dev = Device::cpu();
/// let mut cache = KvCache::new(&dev, KvCacheConfig { num_blocks: 8, dtype: DType::BF16 })?;
/// let seqs = [cache.create_sequence(), cache.create_sequence()];
/// let spec = StepSpec { batch: 2, max_blocks_per_seq: 4, s_q: 1, h_q: 16, layers: 2, dtype: DType::BF16, causal: true, softmax_scale: None, label: None };
/// let mut step = capture_step(&dev, &spec, &[cache.tensor(), cache.tensor()])?;
/// for _token in 0..3 {
///     cache.append_batch(&seqs, &vec![0x3c00; 2 * 576])?;     // one new row per sequence
///     let (bt, sl) = step.lengths_mut();
///     cache.batch_into(&seqs, bt, sl)?;
///     step.q_mut(0).write_bytes(0, &vec![0u8; 2 * 16 * 576 * 2])?;
///     let id = step.replay(&[cache.tensor(), cache.tensor()])?;
///     dev.wait_step(id)?;
/// }
/// assert_eq!(step.out(1).shape(), &[2, 1, 16, 512]);
/// # Ok::<(), mla_core::MlaError>(())
/// ```
pub struct CapturedStep {
    device: Device,
    spec: StepSpec,
    q: Vec<Tensor>,
    out: Vec<Tensor>,
    lse: Vec<Tensor>,
    block_table: Tensor,
    seqlens: Tensor,
    plan: Plan,
    /// The pools the graph reads: (address, shape) of each layer's kv tensor at capture.
    kv: Vec<(usize, Vec<usize>)>,
    shapes: Vec<DecodeShape>,
    gpu: Option<(Graph, crate::gpu::DeviceBuffer)>,
}

fn address(t: &Tensor) -> usize {
    match t.device_ptr() {
        Some(p) => p as usize,
        None => t.host().map(|h| h.bytes().as_ptr() as usize).unwrap_or(0),
    }
}

// Defined here, not in `device`: the device module sits below the step's modules (a
// captured step plans and decodes), so the methods that capture live with the capture.
impl Device {
    /// Captures one decode step of `spec.layers` layers over the pools `kv` (one per layer)
    /// for replays with new contents (see [`CapturedStep`]): a CUDA graph on CUDA, eager
    /// replays on the CPU backend.
    pub fn capture_step(&self, spec: &StepSpec, kv: &[&Tensor]) -> Result<CapturedStep> {
        capture_step(self, spec, kv)
    }
    /// [`Device::capture_step`] with the step's plan made with `popts` (e.g. batch-invariant).
    pub fn capture_step_with(&self, spec: &StepSpec, kv: &[&Tensor], popts: &PlanOptions) -> Result<CapturedStep> {
        capture_step_with(self, spec, kv, popts)
    }
}

/// Captures one decode step of `spec` over the pools `kv` (one per layer). On CUDA: runs
/// the step once (kernels loaded), then captures plan + L × (decode, combine) on a stream of
/// its own into a graph that [`CapturedStep::replay`] launches on the device's stream. On
/// the CPU backend nothing is captured (replays run the same calls).
pub fn capture_step(dev: &Device, spec: &StepSpec, kv: &[&Tensor]) -> Result<CapturedStep> {
    capture_step_with(dev, spec, kv, &PlanOptions::default())
}

/// [`capture_step`] with the step's plan made with `popts` (e.g. batch-invariant: every
/// replay re-plans with the same rule, on the device).
pub fn capture_step_with(dev: &Device, spec: &StepSpec, kv: &[&Tensor], popts: &PlanOptions) -> Result<CapturedStep> {
    let bad = |what: &str, expected: &str, got: String| Err(MlaError::arg(ErrorCode::InvalidArgument, &format!("step spec: {what}"), expected, got));
    if spec.batch == 0 {
        return bad("batch", "at least 1", spec.batch.to_string());
    }
    if spec.max_blocks_per_seq == 0 || spec.max_blocks_per_seq > i32::MAX as usize / BLOCK_SIZE {
        return bad("max_blocks_per_seq", &format!("within [1, {}]", i32::MAX as usize / BLOCK_SIZE), spec.max_blocks_per_seq.to_string());
    }
    if spec.layers == 0 {
        return bad("layers", "at least 1", spec.layers.to_string());
    }
    if !spec.dtype.is_half() {
        return Err(MlaError::arg(ErrorCode::DtypeMismatch, "step spec: dtype", "bf16 or fp16", spec.dtype));
    }
    if kv.len() != spec.layers {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "kv", format!("{} pools (one per layer)", spec.layers), kv.len()));
    }
    let opts = DecodeOptions { causal: spec.causal, softmax_scale: spec.softmax_scale, ..Default::default() };
    check_scale(opts.scale())?;
    let (b, s_q, h_q) = (spec.batch, spec.s_q, spec.h_q);
    let q = (0..spec.layers).map(|_| Tensor::zeros(dev, &[b, s_q, h_q, HEAD_DIM], spec.dtype)).collect::<Result<Vec<_>>>()?;
    let out = (0..spec.layers).map(|_| Tensor::zeros(dev, &[b, s_q, h_q, HEAD_DIM_V], spec.dtype)).collect::<Result<Vec<_>>>()?;
    let lse = (0..spec.layers).map(|_| Tensor::zeros(dev, &[b, h_q, s_q], DType::F32)).collect::<Result<Vec<_>>>()?;
    let block_table = Tensor::from_i32(dev, &vec![crate::consts::BLOCK_TABLE_PAD; b * spec.max_blocks_per_seq], &[b, spec.max_blocks_per_seq])?;
    let seqlens = Tensor::zeros(dev, &[b], DType::I32)?;
    let p = plan_with(&seqlens, s_q * h_q, 1, popts)?;
    let mut shapes = Vec::with_capacity(spec.layers);
    for (l, k) in kv.iter().enumerate() {
        let s = check_decode(&q[l], k, &block_table, &seqlens, &p).map_err(|e| MlaError::new(e.code, format!("layer {l}: {}", e.message)))?;
        check_outputs(&s, dev, &out[l], &lse[l])?;
        shapes.push(s);
    }
    let mut step = CapturedStep {
        device: dev.clone(),
        spec: spec.clone(),
        kv: kv.iter().map(|k| (address(k), k.shape().to_vec())).collect(),
        q,
        out,
        lse,
        block_table,
        seqlens,
        plan: p,
        shapes,
        gpu: None,
    };
    if let Device::Cuda(g) = dev {
        // Once eagerly: loads every kernel (and sets their shared-memory limits).
        let id = step.replay_eager(kv)?;
        dev.wait_step(id)?;
        let flag = g.alloc_zeroed(4)?;
        let stream = g.new_stream()?;
        g.stream().synchronize()?;
        let max_seqlen = (spec.max_blocks_per_seq * BLOCK_SIZE) as i32;
        let sopts = DecodeOptions { stream: Some(stream.clone()), ..opts };
        let CapturedStep { q, out, lse, block_table, seqlens, plan: p, shapes, .. } = &mut step;
        let graph = crate::gpu::with_flag(g, flag.ptr(), || {
            // SAFETY: the graph reads and writes the step's own tensors and plan (owned by the
            // step, which owns the graph too) and the pools `kv`, whose addresses every replay
            // checks against the pools it is given.
            unsafe {
                capture(&stream, || {
                    // The replay's first node clears the graph's error flag: the copy into the
                    // step's slot behind the previous replay has read it (stream order), and a
                    // replay then adds one stream operation, not two (step_with_flag).
                    sys::cuMemsetD32Async(flag.ptr(), 0, 1, stream.cu_stream()).result()?;
                    crate::gpu::ops::plan_into(g, seqlens, p, Some(stream.clone()), max_seqlen)?;
                    for l in 0..kv.len() {
                        let inp = DecodeInputs { q: &q[l], kv: kv[l], block_table, seqlens, plan: p };
                        crate::gpu::ops::decode_into(g, &shapes[l], &inp, &sopts, &mut out[l], &mut lse[l])?;
                    }
                    Ok(())
                })
            }
        })?;
        graph.upload()?;
        stream.synchronize()?;
        step.gpu = Some((Graph(graph), flag));
    }
    Ok(step)
}

impl CapturedStep {
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn spec(&self) -> &StepSpec {
        &self.spec
    }
    /// Whether replays launch a CUDA graph (false on the CPU backend: eager replays).
    pub fn is_graph(&self) -> bool {
        self.gpu.is_some()
    }
    /// Layer `l`'s queries `[batch, s_q, h_q, 576]`: write them before a replay.
    pub fn q(&self, l: usize) -> &Tensor {
        &self.q[l]
    }
    pub fn q_mut(&mut self, l: usize) -> &mut Tensor {
        &mut self.q[l]
    }
    /// Layer `l`'s outputs `[batch, s_q, h_q, 512]` and lse `[batch, h_q, s_q]` of the last replay.
    pub fn out(&self, l: usize) -> &Tensor {
        &self.out[l]
    }
    pub fn lse(&self, l: usize) -> &Tensor {
        &self.lse[l]
    }
    /// Both outputs of layer `l`, for writing (e.g. poisoning them; replays overwrite them).
    pub fn outputs_mut(&mut self, l: usize) -> (&mut Tensor, &mut Tensor) {
        (&mut self.out[l], &mut self.lse[l])
    }
    /// `[batch, max_blocks_per_seq]` int32 and `[batch]` int32, read by every replay.
    pub fn block_table(&self) -> &Tensor {
        &self.block_table
    }
    pub fn seqlens(&self) -> &Tensor {
        &self.seqlens
    }
    /// Both, for writing (e.g. `KvCache::batch_into`).
    pub fn lengths_mut(&mut self) -> (&mut Tensor, &mut Tensor) {
        (&mut self.block_table, &mut self.seqlens)
    }
    /// The plan the replays compute (its metadata describes the last replay's lengths).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn label(&self) -> Cow<'static, str> {
        self.spec.label.clone().unwrap_or(Cow::Borrowed("graph step"))
    }

    /// Replays the step over the pools `kv` (the ones it was captured with: same tensors,
    /// checked by address and shape) with the current contents of its queries, block table
    /// and lengths; returns the step id at once. Content errors (a block index outside a
    /// pool, a length outside `[0, max_blocks_per_seq * 64]`) are reported by the next
    /// synchronising call, naming this step (each layer's outputs are then not valid).
    pub fn replay(&mut self, kv: &[&Tensor]) -> Result<StepId> {
        if kv.len() != self.kv.len() {
            return Err(MlaError::arg(ErrorCode::InvalidArgument, "kv", format!("{} pools (one per layer)", self.kv.len()), kv.len()));
        }
        for (l, (k, (addr, shape))) in kv.iter().zip(&self.kv).enumerate() {
            if address(k) != *addr || k.shape() != &shape[..] || !k.device().same(&self.device) {
                return Err(MlaError::arg(
                    ErrorCode::InvalidArgument,
                    &format!("kv[{l}]"),
                    format!("the pool layer {l} was captured with (shape {shape:?})"),
                    format!("another tensor (shape {:?})", k.shape()),
                ));
            }
        }
        match (&self.device, &self.gpu) {
            (Device::Cuda(g), Some((graph, flag))) => {
                let exec = graph.0.cu_graph_exec();
                let (id, ()) = g.step_with_flag(self.label(), &g.stream().clone(), flag.ptr(), false, || {
                    g.context().bind_to_thread()?;
                    unsafe { sys::cuGraphLaunch(exec, g.stream().cu_stream()).result()? };
                    Ok(())
                })?;
                Ok(id)
            }
            _ => self.replay_eager(kv),
        }
    }

    /// The step's calls, one after the other, as one step (the CPU backend's replay, and
    /// the warm-up before a capture).
    fn replay_eager(&mut self, kv: &[&Tensor]) -> Result<StepId> {
        let label = self.label();
        let dev = self.device.clone();
        let opts = DecodeOptions { causal: self.spec.causal, softmax_scale: self.spec.softmax_scale, label: Some(label.clone()), ..Default::default() };
        let (id, ()) = dev.step(label.clone(), || {
            match self.plan.replan(&self.seqlens) {
                Ok(_) => {}
                Err(e) if e.code == ErrorCode::SeqlenOutOfRange && !dev.is_cuda() => {
                    // A length out of range: recorded for the step like the kernels' flag.
                    for l in 0..kv.len() {
                        self.out[l].fill_bytes(0xFF)?;
                        self.lse[l].fill_bytes(0xFF)?;
                    }
                    dev.fail_step(dev.current_step().unwrap_or(0), label.clone(), e);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            for l in 0..kv.len() {
                enqueue_into(&self.q[l], kv[l], &self.block_table, &self.seqlens, &self.plan, &opts, &mut self.out[l], &mut self.lse[l])?;
            }
            Ok(())
        })?;
        Ok(id)
    }
}

impl std::fmt::Debug for CapturedStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CapturedStep({:?}, {}, graph: {})", self.spec, self.device.kind(), self.is_graph())
    }
}
