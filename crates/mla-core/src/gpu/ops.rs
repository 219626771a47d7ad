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
use crate::{BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V};

fn ptr(t: &Tensor) -> u64 {
    t.device_ptr().expect("a CUDA tensor")
}

/// Where a plan's copy of its lengths sits in its workspace.
fn plan_seqlens_ptr(ws: u64, plan: &Plan) -> u64 {
    ws + ((plan.batch + plan.num_parts) * plan.rows * (HEAD_DIM_V + 1) * 4) as u64
}

fn pick_stream<'a>(g: &'a GpuDevice, s: &'a Option<Arc<CudaStream>>) -> &'a Arc<CudaStream> {
    s.as_ref().unwrap_or(g.stream())
}

/// Enqueues the plan kernel: metadata and num_splits from device-resident lengths.
pub fn plan_into(g: &GpuDevice, seqlens: &Tensor, plan: &mut Plan, stream: Option<Arc<CudaStream>>, max_seqlen: i32) -> Result<()> {
    let f = g.kernels().function("sm90/mla_plan", "mla_plan_kernel", 0)?;
    let ws = plan.workspace.as_ref().expect("a CUDA plan has a workspace");
    let p = MlaPlanParams {
        seqlens: ptr(seqlens),
        metadata: ptr(&plan.metadata),
        num_splits: ptr(&plan.num_splits),
        plan_seqlens: plan_seqlens_ptr(ws.ptr(), plan),
        error_flag: g.error_flag_ptr(),
        b: plan.batch as i32,
        num_parts: plan.num_parts as i32,
        block_size: BLOCK_SIZE as i32,
        fixed_cost: crate::plan::split_fixed_cost() as i32,
        max_seqlen,
    };
    let dims = LaunchDims { grid: (1, 1, 1), block: (256, 1, 1), smem: 0 };
    unsafe { launch(&f, pick_stream(g, &stream), &dims, &p) }
}

/// Which decode kernel runs a shape. Every kernel takes tiles of at most 64 rows, so the
/// plan's part count (multiprocessors / ceil(rows / 64)) fills the chip either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKernel {
    /// mma.sync m16n8k16, tiles of 16, 32 or 64 rows (`mla_decode.cu`).
    MmaSync { tile: usize },
    /// wgmma, tiles of 64 rows, two warpgroups (`mla_decode_wgmma.cu`).
    Wgmma(WgSchedule),
}

/// The loop schedules of the wgmma kernel (see mla_decode_wgmma.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgSchedule {
    /// Load, S, softmax, PV in turn.
    V1,
    /// PV(n) and S(n + 1) back to back, the load of n + 2 under S(n + 1).
    Pipelined,
    /// V1 with the next load issued under S(n) and the rescale skipped where it is 1.
    V2,
}

impl DecodeKernel {
    /// The default by shape: up to 32 rows the mma.sync kernel (16- or 32-row tiles, no
    /// padding) is memory-bound and measured faster; above that wgmma's rate wins
    /// (BENCHMARKS.md, 2026-11-28). MLA_DECODE_KERNEL=mma|wgmma overrides it (for
    /// benchmarking the variants).
    pub fn for_rows(rows: usize) -> DecodeKernel {
        let mma = DecodeKernel::MmaSync { tile: if rows <= 16 { 16 } else if rows <= 32 { 32 } else { GPU_ROW_TILE } };
        match std::env::var("MLA_DECODE_KERNEL").as_deref() {
            Ok("mma") => mma,
            Ok("wgmma") => DecodeKernel::Wgmma(WgSchedule::V2),
            Ok("wgmma-v1") => DecodeKernel::Wgmma(WgSchedule::V1),
            Ok("wgmma-pipe") => DecodeKernel::Wgmma(WgSchedule::Pipelined),
            _ if rows <= 32 => mma,
            _ => DecodeKernel::Wgmma(WgSchedule::V2),
        }
    }
    pub fn tile(self) -> usize {
        match self {
            DecodeKernel::MmaSync { tile } => tile,
            DecodeKernel::Wgmma(_) => GPU_ROW_TILE,
        }
    }
    /// (module, function, dynamic shared memory bytes), kept in step with the kernels'
    /// `Smem` layouts.
    fn function(self, ty: &str) -> (&'static str, String, usize) {
        let kv = 2 * BLOCK_SIZE * HEAD_DIM * 2;
        match self {
            DecodeKernel::MmaSync { tile } => {
                let bytes = tile * HEAD_DIM * 2 + kv + tile * BLOCK_SIZE * 2 + 1024 + 3 * tile * 4;
                ("sm90/mla_decode", format!("mla_decode_{ty}_m{tile}"), bytes)
            }
            DecodeKernel::Wgmma(schedule) => {
                let t = GPU_ROW_TILE;
                let bytes = t * HEAD_DIM * 2 + kv + t * BLOCK_SIZE * 2 + 4 * t * 4 + 3 * t * 4 + 1024;
                let suffix = match schedule {
                    WgSchedule::V1 => "v1",
                    WgSchedule::Pipelined => "p",
                    WgSchedule::V2 => "",
                };
                ("sm90/mla_decode_wgmma", format!("mla_decode_{ty}_wg64{suffix}"), bytes)
            }
        }
    }
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
    if s.b == 0 {
        return Ok(()); // nothing to compute, and a grid of zero blocks is a launch error
    }
    let ws = plan.workspace.as_ref().expect("a CUDA plan has a workspace");
    let slots = (plan.batch + plan.num_parts) as u64;
    let stream = pick_stream(g, &opts.stream);
    let scale = opts.scale();
    let ty = match s.dtype {
        DType::BF16 => "bf16",
        _ => "fp16",
    };
    let kernel = DecodeKernel::for_rows(rows);
    let tile = kernel.tile();
    let (module, name, smem) = kernel.function(ty);
    let smem = smem as u32;
    let f = g.kernels().function(module, &name, smem)?;
    let fc = g.kernels().function("sm90/mla_combine", &format!("mla_combine_{ty}"), 0)?;
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

    let c = MlaCombineParams {
        oaccum,
        lseaccum,
        num_splits: ptr(&plan.num_splits),
        seqlens: ptr(seqlens),
        plan_seqlens: plan_seqlens_ptr(ws.ptr(), plan),
        error_flag: g.error_flag_ptr(),
        out: ptr(out),
        lse: ptr(lse),
        b: s.b as i32,
        s_q: s.s_q as i32,
        h_q: s.h_q as i32,
        rows: rows as i32,
        slots: slots as i32,
    };
    let dims = LaunchDims { grid: (s.b as u32, rows.div_ceil(8) as u32, 1), block: (256, 1, 1), smem: 0 };
    unsafe { launch(&fc, stream, &dims, &c) }
}
