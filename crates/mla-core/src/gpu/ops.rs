//! The three launches of a decode step on CUDA: plan, split-KV decode, combine.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::launch::{launch, LaunchDims};
use super::params::{MlaCombineParams, MlaDecodeParams, MlaPlanParams};
use super::path::KernelPath;
// Tensor maps through the per-thread cache (gpu/tma_cache.rs: same functions as tma.rs).
use super::tma_cache as tma;
use super::GpuDevice;
use crate::dtype::DType;
use crate::error::Result;
use crate::step::options::DecodeOptions;
use crate::step::plan::Plan;
use crate::step::sched::{split_fixed_cost, GPU_ROW_TILE};
use crate::step::shape::{DecodeInputs, DecodeShape};
use crate::tensor::Tensor;
use crate::consts::{BLOCK_SIZE, HEAD_DIM};

fn ptr(t: &Tensor) -> u64 {
    t.device_ptr().expect("a CUDA tensor")
}

/// Where a plan's copy of its lengths sits in its workspace.
fn plan_seqlens_ptr(ws: u64, plan: &Plan) -> u64 {
    ws + plan.workspace_layout().plan_seqlens as u64
}

/// The (chunk_blocks, max_chunks) kernel fields of a plan: (0, 0) for the default plan.
fn chunk_fields(plan: &Plan) -> (i32, i32) {
    plan.chunks().map_or((0, 0), |c| (c.chunk_blocks as i32, c.max_chunks as i32))
}

fn pick_stream<'a>(g: &'a GpuDevice, s: &'a Option<Arc<CudaStream>>) -> &'a Arc<CudaStream> {
    s.as_ref().unwrap_or(g.stream())
}

/// Enqueues the plan kernel: metadata and num_splits from device-resident lengths.
pub fn plan_into(g: &GpuDevice, seqlens: &Tensor, plan: &mut Plan, stream: Option<Arc<CudaStream>>, max_seqlen: i32) -> Result<()> {
    let f = g.kernels().function("common/mla_plan", "mla_plan_kernel", 0)?;
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
        fixed_cost: split_fixed_cost() as i32,
        max_seqlen,
        chunk_blocks: chunk_fields(plan).0,
        max_chunks: chunk_fields(plan).1,
    };
    let dims = LaunchDims { grid: (1, 1, 1), block: (256, 1, 1), smem: 0 };
    unsafe { launch(&f, pick_stream(g, &stream), &dims, &p) }
}

/// Which decode kernel runs a shape. The plan's part count (multiprocessors /
/// ceil(rows / 64)) fills the chip with any of them: a kernel with smaller tiles runs
/// ceil(rows / tile) row tiles per part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKernel {
    /// A TMA producer warp feeding mma.sync consumers, tiles of 16 or 32 rows
    /// (`mla_decode_tma.cu`): the memory-bound shapes.
    Tma { tile: usize },
    /// cp.async + mma.sync, tiles of 16 or 32 rows (`portable/mla_decode.cu`): the portable path.
    MmaSync { tile: usize },
    /// Warp-specialised wgmma, tiles of 64 rows: a TMA producer warpgroup and two consumer
    /// warpgroups (`mla_decode_ws.cu`): the default for 32 rows and more.
    WarpSpecialized,
    /// The same with the seesaw schedule (`mla_decode_ws2.cu`, issue 8 C2): each consumer
    /// warpgroup computes S and the softmax of alternate blocks. MLA_DECODE_KERNEL=ws2
    /// only, until measured.
    Seesaw,
}

impl DecodeKernel {
    /// The default by shape: up to 16 rows the TMA kernel (memory-bound, no padding),
    /// above that the warp-specialised one (BENCHMARKS.md). MLA_DECODE_KERNEL=tma|mma|ws overrides it
    /// (for benchmarking and for testing every kernel on every shape).
    ///
    /// A device on a portable path (not sm_90, or MLA_FORCE_PORTABLE=1) has only the
    /// cp.async kernel: tiles of 16 rows, or 32 where it has them (`portable_max_tile`).
    /// On the Hopper path `mma` names a module it does not load (a typed error at lookup).
    pub fn for_rows(rows: usize, path: KernelPath, portable_max_tile: usize) -> DecodeKernel {
        let tile = if rows <= 16 { 16 } else { 32 };
        if path != KernelPath::Hopper {
            return DecodeKernel::MmaSync { tile: tile.min(portable_max_tile.max(16)) };
        }
        match std::env::var("MLA_DECODE_KERNEL").as_deref() {
            Ok("tma") => DecodeKernel::Tma { tile },
            Ok("mma") => DecodeKernel::MmaSync { tile },
            Ok("ws") => DecodeKernel::WarpSpecialized,
            Ok("ws2") => DecodeKernel::Seesaw,
            // 32 rows and more: the warp-specialised kernel measured faster on every
            // shape of the H200 grid (BENCHMARKS.md, 2026-12-02).
            _ if rows <= 16 => DecodeKernel::Tma { tile },
            _ => DecodeKernel::WarpSpecialized,
        }
    }
    pub fn tile(self) -> usize {
        match self {
            DecodeKernel::Tma { tile } | DecodeKernel::MmaSync { tile } => tile,
            DecodeKernel::WarpSpecialized | DecodeKernel::Seesaw => GPU_ROW_TILE,
        }
    }
    /// (module, function, dynamic shared memory bytes, threads per block), kept in step
    /// with the kernels' `Smem` layouts and launch comments.
    fn function(self, ty: &str) -> (&'static str, String, usize, u32) {
        let row = HEAD_DIM * 2; // bytes of one latent row
        // MmaScratch<M> (mma_tile.cuh): P, two reduction arrays, three row statistics.
        let mma_scratch = |t: usize| t * BLOCK_SIZE * 2 + 1024 + 3 * t * 4;
        match self {
            DecodeKernel::Tma { tile } => {
                // 5 half-block stages, Q, scratch, 12 mbarriers, 1024 of alignment slack.
                let bars = (5 * (BLOCK_SIZE / 2) * row + tile * row + mma_scratch(tile)).div_ceil(8) * 8;
                ("sm90/mla_decode_tma", format!("mla_decode_{ty}_tma{tile}"), bars + 12 * 8 + 1024, 384)
            }
            DecodeKernel::MmaSync { tile } => {
                // Q, a ring of half-block stages, scratch: per tile (gpu/portable.rs).
                ("portable/mla_decode", format!("mla_decode_{ty}_m{tile}"), super::portable::smem_bytes(tile), 256)
            }
            DecodeKernel::WarpSpecialized => {
                // Q, 2 block stages, P, the factors (or 1 / l), 8 mbarriers, alignment slack.
                let t = GPU_ROW_TILE;
                let bytes = t * row + 2 * BLOCK_SIZE * row + t * BLOCK_SIZE * 2 + t * 4 + 8 * 8 + 1024;
                ("sm90/mla_decode_ws", format!("mla_decode_{ty}_ws64"), bytes, 384)
            }
            DecodeKernel::Seesaw => {
                // Q, 2 block stages, reference maxima and factors by block parity, row sums
                // by segment parity and warpgroup, 9 mbarriers, alignment slack.
                let t = GPU_ROW_TILE;
                let bytes = t * row + 2 * BLOCK_SIZE * row + 2 * t * 4 + 2 * t * 4 + 4 * t * 4 + 9 * 8 + 1024;
                ("sm90/mla_decode_ws2", format!("mla_decode_{ty}_ws64s"), bytes, 384)
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn decode_into(
    g: &GpuDevice,
    s: &DecodeShape,
    inp: &DecodeInputs,
    opts: &DecodeOptions,
    out: &mut Tensor,
    lse: &mut Tensor,
) -> Result<()> {
    let DecodeInputs { q, kv, block_table, seqlens, plan } = *inp;
    let rows = s.rows();
    if s.b == 0 {
        return Ok(()); // nothing to compute, and a grid of zero blocks is a launch error
    }
    let ws = plan.workspace.as_ref().expect("a CUDA plan has a workspace");
    let slots = plan.slots as u64;
    let stream = pick_stream(g, &opts.stream);
    let scale = opts.scale();
    let ty = match s.dtype {
        DType::BF16 => "bf16",
        _ => "fp16",
    };
    let kernel = DecodeKernel::for_rows(rows, g.kernel_path(), g.portable_max_tile());
    let tile = kernel.tile();
    let (module, name, smem, threads) = kernel.function(ty);
    let smem = smem as u32;
    let f = g.kernels().function(module, &name, smem)?;
    let fc = g.kernels().function("common/mla_combine", &format!("mla_combine_{ty}"), 0)?;
    let layout = plan.workspace_layout();
    let oaccum = ws.ptr() + layout.oaccum as u64;
    let lseaccum = ws.ptr() + layout.lseaccum as u64;
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
        chunk_blocks: chunk_fields(plan).0,
        max_chunks: chunk_fields(plan).1,
        q_map: Default::default(),
        kv_map: Default::default(),
    };
    let p = match kernel {
        DecodeKernel::Tma { tile } => MlaDecodeParams {
            q_map: tma::q_map(p.q, s.dtype, s.b, rows, tile)?,
            kv_map: tma::kv_map(p.kv, s.dtype, s.num_blocks, BLOCK_SIZE / 2)?,
            ..p
        },
        DecodeKernel::WarpSpecialized | DecodeKernel::Seesaw => MlaDecodeParams {
            q_map: tma::q_map(p.q, s.dtype, s.b, rows, GPU_ROW_TILE)?,
            kv_map: tma::kv_map(p.kv, s.dtype, s.num_blocks, BLOCK_SIZE)?,
            ..p
        },
        _ => p,
    };
    let dims = LaunchDims { grid: (plan.num_parts as u32, rows.div_ceil(tile) as u32, 1), block: (threads, 1, 1), smem };
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
    if super::launch::pdl_enabled() && g.kernel_path() == KernelPath::Hopper {
        // The combine starts its launch under the decode's tail; it waits (griddepcontrol)
        // before it reads anything. Only sm_90 code has that wait: never on the portable path.
        unsafe { super::launch::launch_dependent(&fc, stream, &dims, &c) }
    } else {
        unsafe { launch(&fc, stream, &dims, &c) }
    }
}
