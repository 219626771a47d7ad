//! The decode step: checks, then the CPU backend or the CUDA kernels.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::plan::Plan;
use crate::tensor::Tensor;
use crate::validate::{check_decode, check_outputs, check_scale};
use crate::{HEAD_DIM, HEAD_DIM_V};

#[derive(Clone, Default)]
pub struct DecodeOptions {
    /// Causal masking for s_q > 1: query token j of a length-L sequence sees keys
    /// 0 ..= L - s_q + j. With s_q = 1 it changes nothing. Default false (as FlashMLA).
    pub causal: bool,
    /// Defaults to 1 / sqrt(576).
    pub softmax_scale: Option<f32>,
    /// CUDA only: the stream to enqueue on (default: the device's own stream).
    pub stream: Option<Arc<CudaStream>>,
}

impl DecodeOptions {
    pub fn scale(&self) -> f32 {
        self.softmax_scale.unwrap_or(1.0 / (HEAD_DIM as f32).sqrt())
    }
}

#[derive(Debug)]
pub struct DecodeOutput {
    /// [b, s_q, h_q, 512], q's dtype.
    pub out: Tensor,
    /// [b, h_q, s_q] f32, natural log; +inf for rows that attend to no key.
    pub lse: Tensor,
}

/// One decode step. On CUDA it is enqueued and returns at once: read the results after
/// `Device::synchronize()` (which also reports device-side index errors).
pub fn decode(q: &Tensor, kv: &Tensor, block_table: &Tensor, seqlens: &Tensor, plan: &Plan, opts: &DecodeOptions) -> Result<DecodeOutput> {
    let s = check_decode(q, kv, block_table, seqlens, plan)?;
    check_scale(opts.scale())?;
    let dev = q.device();
    // Every element is written (decode or combine), so CUDA outputs need no memset, which
    // would be queued on the device's stream, not on `opts.stream`.
    let mut out = Tensor::empty(dev, &[s.b, s.s_q, s.h_q, HEAD_DIM_V], s.dtype)?;
    let mut lse = Tensor::empty(dev, &[s.b, s.h_q, s.s_q], DType::F32)?;
    run(&s, q, kv, block_table, seqlens, plan, opts, &mut out, &mut lse)?;
    Ok(DecodeOutput { out, lse })
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
    check_scale(opts.scale())?;
    check_outputs(&s, q.device(), out, lse)?;
    run(&s, q, kv, block_table, seqlens, plan, opts, out, lse)
}

#[allow(clippy::too_many_arguments)]
fn run(
    s: &crate::validate::DecodeShape,
    q: &Tensor,
    kv: &Tensor,
    block_table: &Tensor,
    seqlens: &Tensor,
    plan: &Plan,
    opts: &DecodeOptions,
    out: &mut Tensor,
    lse: &mut Tensor,
) -> Result<()> {
    match q.device() {
        Device::Cpu => {
            let args = crate::cpu::CpuDecodeArgs {
                shape: *s,
                q: q.host().unwrap().as_u16(),
                kv: kv.host().unwrap().as_u16(),
                block_table: block_table.host().unwrap().as_i32(),
                seqlens: seqlens.host().unwrap().as_i32(),
                metadata: plan.metadata.host().unwrap().as_i32(),
                num_splits: plan.num_splits.host().unwrap().as_i32(),
                num_parts: plan.num_parts,
                causal: opts.causal,
                scale: opts.scale(),
            };
            crate::cpu::decode(&args, out.host_mut().unwrap().as_u16_mut(), lse.host_mut().unwrap().as_f32_mut());
            Ok(())
        }
        Device::Cuda(g) => crate::gpu::ops::decode_into(g, s, q, kv, block_table, seqlens, plan, opts, out, lse),
    }
}
