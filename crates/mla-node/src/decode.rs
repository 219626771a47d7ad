//! `decode` (a promise), `decodeSync` and `decodeInto` (enqueue only): translations of
//! `mla_core::decode::{enqueue, enqueue_into_auto}` and `Device::wait_step`. The core owns
//! every rule (plan when omitted, plan sharing, step errors). The tensors and the plan come
//! as ids (`handles`), which cost napi-rs nothing to convert: these are the hot calls.

use std::borrow::Cow;
use std::sync::Arc;

use mla_core::{DecodeOptions, ErrorCode, SharedPlan};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::error::{core, err, Result};
use crate::handles;
use crate::task::CoreTask;
use crate::tensor::{with_all, Tensor, TensorSrc};

/// The outputs of one decode step.
#[napi(object, object_from_js = false)]
pub struct DecodeResult {
    /// [b, s_q, h_q, 512], q's dtype.
    pub out: Tensor,
    /// [b, h_q, s_q] fp32, natural log; +Infinity for rows that attend to no key.
    pub lse: Tensor,
    /// The step that computed them.
    pub step: i64,
}

struct Args {
    q: TensorSrc,
    kv: TensorSrc,
    block_table: TensorSrc,
    seqlens: TensorSrc,
    plan: Option<Arc<SharedPlan>>,
    opts: DecodeOptions,
}

/// Resolves the ids (`handles`) of a decode's tensors and plan: their sources are cloned
/// here, so no reference to the native objects outlives this function.
#[allow(clippy::too_many_arguments)]
fn args(
    q: u32,
    kv_cache: u32,
    block_table: u32,
    cache_seqlens: u32,
    plan: Option<u32>,
    causal: Option<bool>,
    softmax_scale: Option<f64>,
    label: Option<String>,
    batch_invariant: Option<bool>,
) -> Result<Args> {
    // SAFETY: the references die in this function, which runs no JS.
    let (q, kv, block_table, seqlens) = unsafe {
        (
            handles::tensor(q, "q")?.arg("q")?,
            handles::tensor(kv_cache, "kvCache")?.arg("kvCache")?,
            handles::tensor(block_table, "blockTable")?.arg("blockTable")?,
            handles::tensor(cache_seqlens, "cacheSeqlens")?.arg("cacheSeqlens")?,
        )
    };
    Ok(Args {
        q,
        kv,
        block_table,
        seqlens,
        plan: match plan {
            Some(p) => Some(unsafe { handles::plan(p, "plan")? }.get()?.clone()),
            None => None,
        },
        opts: DecodeOptions {
            causal: causal.unwrap_or(false),
            softmax_scale: softmax_scale.map(|s| s as f32),
            stream: None,
            label: label.map(Cow::Owned),
            batch_invariant: batch_invariant.unwrap_or(false),
        },
    })
}

/// `mla_core::decode::enqueue`: allocates the outputs and enqueues the step (planning
/// first when no plan is given); content errors belong to the step.
fn enqueue(a: &Args) -> Result<mla_core::DecodeOutput> {
    let plans: Vec<&Arc<SharedPlan>> = a.plan.iter().collect();
    with_all(&[&a.q, &a.kv, &a.block_table, &a.seqlens], &plans, |t, p| core(|| mla_core::decode::enqueue(t[0], t[1], t[2], t[3], p.first().copied(), &a.opts)))
}

fn device_of(a: &Args) -> mla_core::Device {
    a.q.with(|t| t.device().clone())
}

fn to_js(r: mla_core::DecodeOutput) -> DecodeResult {
    DecodeResult { step: r.step as i64, out: Tensor::owned(r.out), lse: Tensor::owned(r.lse) }
}

/// One decode step as a promise. On CUDA the step is enqueued on the calling thread and the
/// wait for it runs on the libuv thread pool; on the CPU backend the whole computation runs
/// there. `plan` is computed when omitted.
#[napi(ts_return_type = "Promise<DecodeResult>")]
#[allow(clippy::too_many_arguments)]
pub fn decode(
    q: u32,
    kv_cache: u32,
    block_table: u32,
    cache_seqlens: u32,
    plan: Option<u32>,
    causal: Option<bool>,
    softmax_scale: Option<f64>,
    label: Option<String>,
    batch_invariant: Option<bool>,
) -> Result<AsyncTask<DecodeTask>> {
    let a = args(q, kv_cache, block_table, cache_seqlens, plan, causal, softmax_scale, label, batch_invariant)?;
    let device = device_of(&a);
    let work = if device.is_cuda() { Work::Wait(enqueue(&a)?) } else { Work::Compute(a) };
    Ok(CoreTask::new(
        move || {
            let out = match work {
                Work::Wait(r) => r,
                Work::Compute(a) => enqueue(&a)?,
            };
            core(|| device.wait_step(out.step))?;
            Ok(out)
        },
        to_js,
    ))
}

/// CUDA: `mla_core::decode::enqueue` on the calling thread, returning the outputs and the
/// step at once (the outputs are valid once the step completed: src/decode.ts polls
/// `pollStep`, then falls back to `Device.waitStep`). The result objects are made here,
/// while the kernels run, not after the wait. Other devices: `null`, nothing done (their
/// `decode` computes on the libuv pool).
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn decode_enqueue(
    q: u32,
    kv_cache: u32,
    block_table: u32,
    cache_seqlens: u32,
    plan: Option<u32>,
    causal: Option<bool>,
    softmax_scale: Option<f64>,
    label: Option<String>,
    batch_invariant: Option<bool>,
) -> Result<Option<DecodeResult>> {
    mla_core::trace::mark("native:enter");
    let a = args(q, kv_cache, block_table, cache_seqlens, plan, causal, softmax_scale, label, batch_invariant)?;
    if !device_of(&a).is_cuda() {
        return Ok(None);
    }
    let r = to_js(enqueue(&a)?);
    mla_core::trace::mark("native:exit");
    Ok(Some(r))
}

/// Whether the step that computes `out` (a tensor of that step's device) has completed,
/// without waiting (`mla_core::Device::poll_step`); throws the step's own error once it
/// has, if it failed.
#[napi]
pub fn poll_step(out: &Tensor, step: i64) -> Result<bool> {
    let step = core(|| mla_core::validate::step_id(step))?;
    let d = out.src()?.with(|t| t.device().clone());
    core(|| d.poll_step(step))
}

/// One decode step on the calling (JS) thread: enqueue, then wait for the step.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn decode_sync(
    q: u32,
    kv_cache: u32,
    block_table: u32,
    cache_seqlens: u32,
    plan: Option<u32>,
    causal: Option<bool>,
    softmax_scale: Option<f64>,
    label: Option<String>,
    batch_invariant: Option<bool>,
) -> Result<DecodeResult> {
    let a = args(q, kv_cache, block_table, cache_seqlens, plan, causal, softmax_scale, label, batch_invariant)?;
    let r = enqueue(&a)?;
    let d = device_of(&a);
    core(|| d.wait_step(r.step))?;
    Ok(to_js(r))
}

/// `mla_core::decode::enqueue_into` into caller-owned `out` / `lse` (tensors of their own,
/// not used by a pending operation): returns the step id once the work is queued. With no
/// plan, one is made for the call (an allocation, part of the same step).
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn decode_into(
    q: u32,
    kv_cache: u32,
    block_table: u32,
    cache_seqlens: u32,
    plan: Option<u32>,
    causal: Option<bool>,
    softmax_scale: Option<f64>,
    label: Option<String>,
    batch_invariant: Option<bool>,
    out: u32,
    lse: u32,
) -> Result<i64> {
    mla_core::trace::mark("native:enter");
    let a = args(q, kv_cache, block_table, cache_seqlens, plan, causal, softmax_scale, label, batch_invariant)?;
    if out == lse {
        return Err(err(ErrorCode::InvalidArgument, "out, lse: expected two distinct tensors, got the same one twice"));
    }
    // SAFETY: two distinct tensors (one id per object), used within this call only, which
    // runs no JS; no other reference to them is held (`args` cloned the inputs' sources).
    let (out, lse) = unsafe { (handles::tensor_mut(out, "out")?.owned_mut("out")?, handles::tensor_mut(lse, "lse")?.owned_mut("lse")?) };
    let plans: Vec<&Arc<SharedPlan>> = a.plan.iter().collect();
    with_all(&[&a.q, &a.kv, &a.block_table, &a.seqlens], &plans, |t, p| {
        core(|| mla_core::decode::enqueue_into_auto(t[0], t[1], t[2], t[3], p.first().copied(), &a.opts, out, lse))
    })
    .map(|id| {
        mla_core::trace::mark("native:exit");
        id as i64
    })
}

enum Work {
    /// CUDA: the enqueued step, to wait for.
    Wait(mla_core::DecodeOutput),
    /// The CPU backend: compute on the thread pool.
    Compute(Args),
}

// Every part of the work is Send (Arc'd core objects; DecodeOptions holds an
// Option<Arc<CudaStream>>, which cudarc marks Send + Sync).
pub type DecodeTask = CoreTask<mla_core::DecodeOutput, DecodeResult>;
