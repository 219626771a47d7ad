//! `decode` (libuv thread pool) and `decodeSync`: `mla_core::decode` then
//! `Device::synchronize()`, which turns device-side index errors into typed errors.

use std::sync::Arc;

use mla_core::DecodeOptions;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::error::{core, core_async, reject_with_code, Failure, Result};
use crate::plan::{Plan, SharedPlan};
use crate::tensor::{with_all, Tensor, TensorSrc};

/// The outputs of one decode step.
#[napi(object, object_from_js = false)]
pub struct DecodeResult {
    /// [b, s_q, h_q, 512], q's dtype.
    pub out: Tensor,
    /// [b, h_q, s_q] fp32, natural log; +Infinity for rows that attend to no key.
    pub lse: Tensor,
}

struct Args {
    q: TensorSrc,
    kv: TensorSrc,
    block_table: TensorSrc,
    seqlens: TensorSrc,
    plan: Option<Arc<SharedPlan>>,
    opts: DecodeOptions,
}

#[allow(clippy::too_many_arguments)]
fn args(
    q: &Tensor,
    kv_cache: &Tensor,
    block_table: &Tensor,
    cache_seqlens: &Tensor,
    plan: Option<&Plan>,
    causal: Option<bool>,
    softmax_scale: Option<f64>,
) -> Result<Args> {
    Ok(Args {
        q: q.arg("q")?,
        kv: kv_cache.arg("kvCache")?,
        block_table: block_table.arg("blockTable")?,
        seqlens: cache_seqlens.arg("cacheSeqlens")?,
        plan: match plan {
            Some(p) => Some(p.get()?.clone()),
            None => None,
        },
        opts: DecodeOptions {
            causal: causal.unwrap_or(false),
            softmax_scale: softmax_scale.map(|s| s as f32),
            stream: None,
        },
    })
}

fn run(a: &Args) -> Result<mla_core::DecodeOutput> {
    with_all(&[&a.q, &a.kv, &a.block_table, &a.seqlens], |t| {
        let (q, kv, bt, sl) = (t[0], t[1], t[2], t[3]);
        // Plan (when omitted), decode and the wait for the device form one step that no
        // other step on the device interleaves with, so an error the kernels flag on the
        // device reaches this decode and no other.
        core(|| {
            q.device().run_step(|| {
                let plan = match &a.plan {
                    Some(p) => p.clone(),
                    None => {
                        // The plan for q's shape; a q or cache of the wrong rank is reported
                        // by decode's own checks (the plan for 1 row is only a placeholder).
                        let (s_q, h_q) = if q.shape().len() == 4 {
                            (q.shape()[1], q.shape()[2])
                        } else {
                            (1, 1)
                        };
                        let h_kv = if kv.shape().len() == 4 && kv.shape()[2] > 0 {
                            kv.shape()[2]
                        } else {
                            1
                        };
                        let rows = s_q.checked_mul(h_q).map_or(1, |r| (r / h_kv).max(1));
                        SharedPlan::new(mla_core::plan(sl, rows, h_kv)?)
                    }
                };
                // One decode at a time per plan (its GPU workspace).
                let _busy = plan.busy.lock().unwrap_or_else(|e| e.into_inner());
                mla_core::decode(q, kv, bt, sl, &plan, &a.opts)
            })
        })
    })
}

fn to_js(r: mla_core::DecodeOutput) -> DecodeResult {
    DecodeResult {
        out: Tensor::owned(r.out),
        lse: Tensor::owned(r.lse),
    }
}

/// One decode step on the libuv thread pool. `plan` is computed when omitted.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn decode(
    q: &Tensor,
    kv_cache: &Tensor,
    block_table: &Tensor,
    cache_seqlens: &Tensor,
    plan: Option<&Plan>,
    causal: Option<bool>,
    softmax_scale: Option<f64>,
) -> Result<AsyncTask<DecodeTask>> {
    let a = args(
        q,
        kv_cache,
        block_table,
        cache_seqlens,
        plan,
        causal,
        softmax_scale,
    )?;
    Ok(AsyncTask::new(DecodeTask {
        args: a,
        failure: None,
    }))
}

/// One decode step on the calling (JS) thread.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn decode_sync(
    q: &Tensor,
    kv_cache: &Tensor,
    block_table: &Tensor,
    cache_seqlens: &Tensor,
    plan: Option<&Plan>,
    causal: Option<bool>,
    softmax_scale: Option<f64>,
) -> Result<DecodeResult> {
    let a = args(
        q,
        kv_cache,
        block_table,
        cache_seqlens,
        plan,
        causal,
        softmax_scale,
    )?;
    run(&a).map(to_js)
}

pub struct DecodeTask {
    args: Args,
    failure: Option<Failure>,
}

// SAFETY-free: every field is Send (Arc'd core objects; DecodeOptions holds an
// Option<Arc<CudaStream>>, which cudarc marks Send + Sync).
impl Task for DecodeTask {
    type Output = Option<mla_core::DecodeOutput>;
    type JsValue = DecodeResult;

    fn compute(&mut self) -> napi::Result<Self::Output> {
        match core_async(|| run(&self.args)) {
            Ok(r) => Ok(Some(r)),
            Err(f) => {
                self.failure = Some(f);
                Ok(None)
            }
        }
    }

    fn resolve(&mut self, env: Env, out: Self::Output) -> napi::Result<DecodeResult> {
        match (out, self.failure.take()) {
            (Some(r), _) => Ok(to_js(r)),
            (None, Some(f)) => Err(reject_with_code(&env, f)),
            (None, None) => unreachable!(),
        }
    }
}
