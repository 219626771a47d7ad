//! The three launches of a decode step on CUDA: plan, split-KV decode, combine.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::launch::{launch, LaunchDims};
use super::params::{MlaCombineParams, MlaDecodeParams, MlaPlanParams};
use super::GpuDevice;
use crate::decode::DecodeOptions;
use crate::dtype::DType;
use crate::error::Result;
use crate::plan::{Plan, GPU_ROW_TILE};
use crate::tensor::Tensor;
use crate::validate::DecodeShape;
use crate::{BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V, SPLIT_FIXED_COST};

fn ptr(t: &Tensor) -> u64 {
    t.device_ptr().expect("a CUDA tensor")
}

fn pick_stream<'a>(g: &'a GpuDevice, s: &'a Option<Arc<CudaStream>>) -> &'a Arc<CudaStream> {
    s.as_ref().unwrap_or(g.stream())
}

/// Enqueues the plan kernel: metadata and num_splits from device-resident lengths.
pub fn plan_into(g: &GpuDevice, seqlens: &Tensor, plan: &mut Plan, stream: Option<Arc<CudaStream>>, max_seqlen: i32) -> Result<()> {
    let f = g.kernels().function("sm90/mla_plan", "mla_plan_kernel", 0)?;
    let p = MlaPlanParams {
        seqlens: ptr(seqlens),
        metadata: ptr(&plan.metadata),
        num_splits: ptr(&plan.num_splits),
        error_flag: g.error_flag_ptr(),
        b: plan.batch as i32,
        num_parts: plan.num_parts as i32,
        block_size: BLOCK_SIZE as i32,
        fixed_cost: SPLIT_FIXED_COST as i32,
        max_seqlen,
    };
    let dims = LaunchDims { grid: (1, 1, 1), block: (256, 1, 1), smem: 0 };
    unsafe { launch(&f, pick_stream(g, &stream), &dims, &p) }
}

/// Rows per thread block of the decode kernel for `rows` query rows: 16, 32 or 64.
pub fn row_tile(rows: usize) -> usize {
    if rows <= 16 {
        16
    } else if rows <= 32 {
        32
    } else {
        GPU_ROW_TILE
    }
}

/// Dynamic shared memory of the decode kernel for a row tile (see mla_decode.cu).
pub fn decode_smem_bytes(tile: usize) -> usize {
    let q = tile * HEAD_DIM * 2;
    let kv = 2 * BLOCK_SIZE * HEAD_DIM * 2;
    let p = tile * BLOCK_SIZE * 2;
    let red = 2 * 8 * tile * 4 / (tile / 16); // partial row max / sum per column group of warps
    let stats = 3 * tile * 4;
    q + kv + p + red + stats
}

#[allow(clippy::too_many_arguments)]
pub fn decode_into(
    g: &GpuDevice,
    s: &DecodeShape,
    q: &Tensor,
    kv: &Tensor,
    block_table: &Tensor,
    seqlens: &Tensor,
    plan: &Plan,
    opts: &DecodeOptions,
    out: &mut Tensor,
    lse: &mut Tensor,
) -> Result<()> {
    let rows = s.rows();
    let ws = plan.workspace.as_ref().expect("a CUDA plan has a workspace");
    let slots = (plan.batch + plan.num_parts) as u64;
    let stream = pick_stream(g, &opts.stream);
    let scale = opts.scale();
    let ty = match s.dtype {
        DType::BF16 => "bf16",
        _ => "fp16",
    };
    let tile = row_tile(rows);
    let smem = decode_smem_bytes(tile) as u32;
    let f = g.kernels().function("sm90/mla_decode", &format!("mla_decode_{ty}_m{tile}"), smem)?;
    let oaccum = ws.ptr();
    let lseaccum = oaccum + slots * rows as u64 * HEAD_DIM_V as u64 * 4;
    let p = MlaDecodeParams {
        q: ptr(q),
        kv: ptr(kv),
        block_table: ptr(block_table),
        seqlens: ptr(seqlens),
        out: ptr(out),
        lse: ptr(lse),
        oaccum,
        lseaccum,
        metadata: ptr(&plan.metadata),
        num_splits: ptr(&plan.num_splits),
        error_flag: g.error_flag_ptr(),
        b: s.b as i32,
        s_q: s.s_q as i32,
        h_q: s.h_q as i32,
        rows: rows as i32,
        num_blocks: s.num_blocks as i32,
        max_blocks_per_seq: s.max_blocks_per_seq as i32,
        num_parts: plan.num_parts as i32,
        causal: opts.causal as i32,
        scale,
        scale_log2: scale * std::f32::consts::LOG2_E,
    };
    let dims = LaunchDims { grid: (plan.num_parts as u32, rows.div_ceil(tile) as u32, 1), block: (256, 1, 1), smem };
    unsafe { launch(&f, stream, &dims, &p)? };

    let fc = g.kernels().function("sm90/mla_combine", &format!("mla_combine_{ty}"), 0)?;
    let c = MlaCombineParams {
        oaccum,
        lseaccum,
        num_splits: ptr(&plan.num_splits),
        out: ptr(out),
        lse: ptr(lse),
        b: s.b as i32,
        s_q: s.s_q as i32,
        h_q: s.h_q as i32,
        rows: rows as i32,
    };
    let dims = LaunchDims { grid: (s.b as u32, rows.div_ceil(8) as u32, 1), block: (256, 1, 1), smem: 0 };
    unsafe { launch(&fc, stream, &dims, &c) }
}
