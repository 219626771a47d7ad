//! The decode step: checks, then the CPU backend or the CUDA kernels.
//!
//! Four entry points, one computation:
//!
//! - [`decode`]: allocates the outputs and enqueues one step (on CUDA it returns at once;
//!   the CPU backend computes before returning). Errors about tensor contents: CPU now,
//!   CUDA at the next synchronising call.
//! - [`decode_into`]: the same into caller-owned outputs (fixed addresses, no allocation).
//! - [`enqueue_into`]: [`decode_into`] for a serving loop: returns the step's id, and on
//!   both backends reports errors about tensor contents (block indices, lengths, a stale
//!   plan) at the next synchronising call, naming the step (see [`Device::step`]).
//! - [`decode_auto`]: [`decode`] that plans when no plan is given (one step).
//!
//! A plan holds the workspace of partial results. Decodes that share a plan on one stream
//! are ordered by the stream; when a plan moves to another stream, that stream first waits
//! for the plan's earlier work (see `Plan`), so sharing a plan is always safe.

use crate::consts::HEAD_DIM_V;
use crate::device::{Device, StepId};
use crate::dtype::DType;
use crate::error::{ErrorCode, MlaError, Result};
use crate::plan::{Plan, PlanOptions};
use crate::step::shape::DecodeInputs;
use crate::tensor::Tensor;
use crate::validate::{check_decode, check_outputs, check_scale, DecodeShape};

pub use crate::step::options::DecodeOptions;

#[derive(Debug)]
pub struct DecodeOutput {
    /// [b, s_q, h_q, 512], q's dtype.
    pub out: Tensor,
    /// [b, h_q, s_q] f32, natural log; +inf for rows that attend to no key.
    pub lse: Tensor,
    /// The step that computes them ([`Device::wait_step`] waits for it).
    pub step: StepId,
}

/// One decode step. On CUDA it is enqueued and returns at once: read the results after
/// `Device::synchronize()` or `Device::wait_step(out.step)` (which also report device-side
/// index errors); reading `out` to the host waits too.
///
/// ```
/// use mla_core::{decode, plan, DType, DecodeOptions, Device, Tensor};
/// let dev = Device::cpu();
/// let q = Tensor::from_f32(&dev, &vec![0.1; 16 * 576], &[1, 1, 16, 576], DType::BF16)?;
/// let kv = Tensor::from_f32(&dev, &vec![0.1; 64 * 576], &[1, 64, 1, 576], DType::BF16)?;
/// let bt = Tensor::from_i32(&dev, &[0], &[1, 1])?;
/// let sl = Tensor::from_i32(&dev, &[10], &[1])?;
/// let r = decode(&q, &kv, &bt, &sl, &plan(&sl, 16, 1)?, &DecodeOptions::default())?;
/// dev.wait_step(r.step)?;
/// assert_eq!(r.out.shape(), &[1, 1, 16, 512]);
/// # Ok::<(), mla_core::MlaError>(())
/// ```
pub fn decode(q: &Tensor, kv: &Tensor, block_table: &Tensor, seqlens: &Tensor, plan: &Plan, opts: &DecodeOptions) -> Result<DecodeOutput> {
    let s = check_decode(q, kv, block_table, seqlens, plan)?;
    check_invariant(plan, opts)?;
    check_scale(opts.scale())?;
    let (mut out, mut lse) = outputs(q.device(), &s)?;
    let step = run(&s, q, kv, block_table, seqlens, plan, opts, &mut out, &mut lse)?;
    Ok(DecodeOutput { out, lse, step })
}

/// The output tensors of a decode of shape `s`. Every element is written (decode or
/// combine), so CUDA outputs need no memset.
fn outputs(dev: &Device, s: &DecodeShape) -> Result<(Tensor, Tensor)> {
    Ok((Tensor::empty(dev, &[s.b, s.s_q, s.h_q, HEAD_DIM_V], s.dtype)?, Tensor::empty(dev, &[s.b, s.h_q, s.s_q], DType::F32)?))
}

/// [`decode`] into caller-owned outputs (fixed addresses, for CUDA-graph capture).
#[allow(clippy::too_many_arguments)]
pub fn decode_into(
    q: &Tensor,
    kv: &Tensor,
    block_table: &Tensor,
    seqlens: &Tensor,
    plan: &Plan,
    opts: &DecodeOptions,
    out: &mut Tensor,
    lse: &mut Tensor,
) -> Result<()> {
    let s = check_decode(q, kv, block_table, seqlens, plan)?;
    check_invariant(plan, opts)?;
    check_scale(opts.scale())?;
    check_outputs(&s, q.device(), out, lse)?;
    run(&s, q, kv, block_table, seqlens, plan, opts, out, lse).map(|_| ())
}

/// Whether an error is about tensor contents (what CUDA kernels check on the device).
fn is_content_error(e: &MlaError) -> bool {
    matches!(e.code, ErrorCode::BlockIndexOutOfRange | ErrorCode::SeqlenOutOfRange)
}

/// The sizes of a call whose shape checks passed (`check_decode` checks contents last).
fn shape_of(q: &Tensor, kv: &Tensor, block_table: &Tensor) -> DecodeShape {
    DecodeShape {
        b: q.shape()[0],
        s_q: q.shape()[1],
        h_q: q.shape()[2],
        h_kv: kv.shape()[2],
        num_blocks: kv.shape()[0],
        max_blocks_per_seq: block_table.shape()[1],
        dtype: q.dtype(),
    }
}

/// [`decode_into`] for a serving loop: enqueues one step and returns its id at once.
///
/// Shapes, dtypes, devices and the plan's sizes are checked now (an error launches
/// nothing). Errors about tensor contents (a block index that would be read outside the
/// pool, a length out of range, on CUDA a plan made for other lengths) are reported by the
/// next synchronising call ([`Device::synchronize`], [`Device::wait_step`], reading a tensor
/// to the host), naming this step — on both backends: the CPU backend records them for the
/// step (and fills its outputs with NaN) instead of returning them here. Nothing is
/// allocated on either backend.
///
/// ```
/// use mla_core::decode::{enqueue_into, DecodeOptions};
/// use mla_core::{plan, DType, Device, ErrorCode, Tensor};
/// let dev = Device::cpu();
/// let q = Tensor::from_f32(&dev, &vec![0.1; 16 * 576], &[1, 1, 16, 576], DType::BF16)?;
/// let kv = Tensor::from_f32(&dev, &vec![0.1; 64 * 576], &[1, 64, 1, 576], DType::BF16)?;
/// let sl = Tensor::from_i32(&dev, &[10], &[1])?;
/// let p = plan(&sl, 16, 1)?;
/// let (mut out, mut lse) = (Tensor::zeros(&dev, &[1, 1, 16, 512], DType::BF16)?, Tensor::zeros(&dev, &[1, 16, 1], DType::F32)?);
/// let bad = Tensor::from_i32(&dev, &[7], &[1, 1])?; // block 7 of a 1-block pool
/// let step = enqueue_into(&q, &kv, &bad, &sl, &p, &DecodeOptions::default(), &mut out, &mut lse)?;
/// let e = dev.synchronize().unwrap_err();
/// assert_eq!(e.code, ErrorCode::BlockIndexOutOfRange);
/// assert!(e.message.starts_with(&format!("step {step} (decode)")));
/// # Ok::<(), mla_core::MlaError>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn enqueue_into(
    q: &Tensor,
    kv: &Tensor,
    block_table: &Tensor,
    seqlens: &Tensor,
    plan: &Plan,
    opts: &DecodeOptions,
    out: &mut Tensor,
    lse: &mut Tensor,
) -> Result<StepId> {
    check_scale(opts.scale())?;
    check_invariant(plan, opts)?;
    let dev = q.device();
    match check_decode(q, kv, block_table, seqlens, plan) {
        Ok(s) => {
            check_outputs(&s, dev, out, lse)?;
            run(&s, q, kv, block_table, seqlens, plan, opts, out, lse)
        }
        Err(e) if is_content_error(&e) && !dev.is_cuda() => {
            let s = shape_of(q, kv, block_table);
            check_outputs(&s, dev, out, lse)?;
            let (id, ()) = dev.step(opts.label(), || {
                out.fill_bytes(0xFF)?;
                lse.fill_bytes(0xFF)
            })?;
            dev.fail_step(id, opts.label(), e);
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

/// [`enqueue_into`], planning first when `plan` is `None` (a plan made for the call, with
/// the options' `batch_invariant`, in the same step): what the Node binding's `decodeInto`
/// runs.
#[allow(clippy::too_many_arguments)]
pub fn enqueue_into_auto(
    q: &Tensor,
    kv: &Tensor,
    block_table: &Tensor,
    seqlens: &Tensor,
    plan: Option<&Plan>,
    opts: &DecodeOptions,
    out: &mut Tensor,
    lse: &mut Tensor,
) -> Result<StepId> {
    match plan {
        Some(p) => enqueue_into(q, kv, block_table, seqlens, p, opts, out, lse),
        None => q
            .device()
            .clone()
            .step(opts.label(), || {
                let p = plan_for_with(q, kv, seqlens, &auto_plan_options(opts))?;
                enqueue_into(q, kv, block_table, seqlens, &p, opts, out, lse)
            })
            .map(|(id, _)| id),
    }
}

/// The plan a decode of `q` over `kv` needs for `seqlens` (what [`decode_auto`] makes when
/// none is given). Tensors of the wrong rank get a placeholder plan for one row, so that
/// the decode's own checks report them.
pub fn plan_for(q: &Tensor, kv: &Tensor, seqlens: &Tensor) -> Result<Plan> {
    plan_for_with(q, kv, seqlens, &PlanOptions::default())
}

/// [`plan_for`] with plan options (`DecodeOptions::batch_invariant` gives
/// `PlanOptions::invariant()`).
pub fn plan_for_with(q: &Tensor, kv: &Tensor, seqlens: &Tensor, popts: &PlanOptions) -> Result<Plan> {
    let (s_q, h_q) = if q.shape().len() == 4 { (q.shape()[1], q.shape()[2]) } else { (1, 1) };
    let h_kv = if kv.shape().len() == 4 && kv.shape()[2] > 0 { kv.shape()[2] } else { 1 };
    let rows = s_q.checked_mul(h_q).map_or(1, |r| (r / h_kv).max(1));
    crate::plan::plan_with(seqlens, rows, h_kv, popts)
}

/// The plan options a decode without a plan uses.
fn auto_plan_options(opts: &DecodeOptions) -> PlanOptions {
    PlanOptions { batch_invariant: opts.batch_invariant, chunks: None }
}

/// `batch_invariant` asked for with a plan that is not.
fn check_invariant(plan: &Plan, opts: &DecodeOptions) -> Result<()> {
    if opts.batch_invariant && !plan.batch_invariant() {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "plan", "a batch-invariant plan (batch_invariant was asked for)", "a default plan"));
    }
    Ok(())
}

/// [`decode`], planning first when `plan` is `None` (plan and decode are one step).
pub fn decode_auto(q: &Tensor, kv: &Tensor, block_table: &Tensor, seqlens: &Tensor, plan: Option<&Plan>, opts: &DecodeOptions) -> Result<DecodeOutput> {
    match plan {
        Some(p) => decode(q, kv, block_table, seqlens, p, opts),
        None => {
            let (step, out) = q.device().step(opts.label(), || {
                let p = plan_for_with(q, kv, seqlens, &auto_plan_options(opts))?;
                decode(q, kv, block_table, seqlens, &p, opts)
            })?;
            Ok(DecodeOutput { step, ..out })
        }
    }
}

/// [`decode_auto`] with the model of [`enqueue_into`] on both backends: allocates the
/// outputs, plans when `plan` is `None`, and enqueues one step; errors about tensor
/// contents are reported by the next synchronising call (e.g. [`Device::wait_step`] of the
/// returned step), naming the step. The step is tracked (see `Device::step_tracked`): made
/// to be waited on by itself. What the Node binding's `decode` and `decodeSync` run.
pub fn enqueue(q: &Tensor, kv: &Tensor, block_table: &Tensor, seqlens: &Tensor, plan: Option<&Plan>, opts: &DecodeOptions) -> Result<DecodeOutput> {
    check_scale(opts.scale())?;
    let dev = q.device();
    crate::trace::mark("enqueue:start");
    let (step, (out, lse)) = dev.step_tracked(opts.label(), || {
        let owned;
        let p = match plan {
            Some(p) => p,
            None => {
                owned = plan_for_with(q, kv, seqlens, &auto_plan_options(opts))?;
                &owned
            }
        };
        let s = match check_decode(q, kv, block_table, seqlens, p) {
            Ok(s) => s,
            Err(e) if is_content_error(&e) && !dev.is_cuda() => shape_of(q, kv, block_table),
            Err(e) => return Err(e),
        };
        let (mut out, mut lse) = outputs(dev, &s)?;
        crate::trace::mark("enqueue:outputs");
        enqueue_into(q, kv, block_table, seqlens, p, opts, &mut out, &mut lse)?;
        Ok((out, lse))
    })?;
    Ok(DecodeOutput { out, lse, step })
}

/// Enqueues the decode as a step of its device and returns the step's id: one call into
/// either backend, with the same arguments.
#[allow(clippy::too_many_arguments)]
fn run(
    s: &DecodeShape,
    q: &Tensor,
    kv: &Tensor,
    block_table: &Tensor,
    seqlens: &Tensor,
    plan: &Plan,
    opts: &DecodeOptions,
    out: &mut Tensor,
    lse: &mut Tensor,
) -> Result<StepId> {
    let inputs = DecodeInputs { q, kv, block_table, seqlens, plan };
    match q.device() {
        Device::Cpu => {
            let (id, ()) = Device::Cpu.step(opts.label(), || crate::cpu::decode_into(s, &inputs, opts, out, lse))?;
            Ok(id)
        }
        Device::Cuda(g) => {
            let stream = opts.stream.clone().unwrap_or_else(|| g.stream().clone());
            let capturing = g.prepare_stream(&stream)?;
            plan.order_on(g, &stream, capturing)?;
            if capturing {
                // Inside a stream capture (`gpu::graph::capture`): no step bookkeeping can be
                // queued; the kernels flag the current step of this thread, if any, else the
                // device's flag for work outside steps (reported by `synchronize`).
                crate::gpu::ops::decode_into(g, s, &inputs, opts, out, lse)?;
                return Ok(g.current_step().unwrap_or(0));
            }
            let (id, ()) = g.step(opts.label(), &stream, || {
                crate::trace::mark("decode:launch");
                let r = crate::gpu::ops::decode_into(g, s, &inputs, opts, out, lse);
                crate::trace::mark("decode:launched");
                r
            })?;
            Ok(id)
        }
    }
}
