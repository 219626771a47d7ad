//! The three launches of a decode step on CUDA: plan, split-KV decode, combine.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use mla_kernels::entries as k;
use mla_kernels::Entry;

use super::launch::{launch, launch_cluster, max_active_clusters, LaunchDims};
use super::params::{MlaCombineParams, MlaDecodeParams, MlaPlanParams};
use super::path::KernelPath;
// Tensor maps through the per-thread cache (gpu/tma_cache.rs: same functions as tma.rs).
use super::tma_cache as tma;
use super::GpuDevice;
use crate::consts::BLOCK_SIZE;
use crate::dtype::DType;
use crate::error::Result;
use crate::step::options::DecodeOptions;
use crate::step::plan::Plan;
use crate::step::sched::{split_fixed_cost, GPU_ROW_TILE};
use crate::step::shape::{DecodeInputs, DecodeShape};
use crate::tensor::Tensor;

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
    let (f, _) = g.kernels().function(k::MLA_PLAN_KERNEL)?;
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
    /// cp.async + mma.sync, tiles of 16 or 32 rows (`kernels/portable/decode/mla_decode.cu`): the portable path.
    MmaSync { tile: usize },
    /// Warp-specialised wgmma, tiles of 64 rows: a TMA producer warpgroup and two consumer
    /// warpgroups (`mla_decode_ws.cu`): the default for 32 rows and more.
    WarpSpecialized,
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
            // 32 rows and more: the warp-specialised kernel measured faster on every
            // shape of the H200 grid (BENCHMARKS.md, 2026-12-02).
            _ if rows <= 16 => DecodeKernel::Tma { tile },
            _ => DecodeKernel::WarpSpecialized,
        }
    }
    pub fn tile(self) -> usize {
        match self {
            DecodeKernel::Tma { tile } | DecodeKernel::MmaSync { tile } => tile,
            DecodeKernel::WarpSpecialized => GPU_ROW_TILE,
        }
    }
    /// The entry point for `dtype` and its threads per block (the kernels' launch
    /// comments); its dynamic shared memory is the kernel's own (`Kernels::function`).
    fn entry(self, dtype: DType) -> (Entry, u32) {
        let bf16 = dtype == DType::BF16;
        let pick = |b: Entry, f: Entry| if bf16 { b } else { f };
        match self {
            DecodeKernel::Tma { tile: 16 } => (pick(k::MLA_DECODE_BF16_TMA16, k::MLA_DECODE_FP16_TMA16), 384),
            DecodeKernel::Tma { .. } => (pick(k::MLA_DECODE_BF16_TMA32, k::MLA_DECODE_FP16_TMA32), 384),
            DecodeKernel::MmaSync { tile: 16 } => (pick(k::MLA_DECODE_BF16_M16, k::MLA_DECODE_FP16_M16), 256),
            DecodeKernel::MmaSync { .. } => (pick(k::MLA_DECODE_BF16_M32, k::MLA_DECODE_FP16_M32), 256),
            DecodeKernel::WarpSpecialized => (pick(k::MLA_DECODE_BF16_WS64, k::MLA_DECODE_FP16_WS64), 384),
        }
    }
}

/// Row tiles per thread block cluster of the warp-specialised kernel: 2 (the tiles of a part
/// read the same blocks, so each CTA of a pair loads half of every block and multicasts it
/// to both: half the L2 reads, BENCHMARKS.md) where the grid's tiles pair up and the device
/// runs a pair on every two multiprocessors at once; else 1. MLA_WS_CLUSTER=1 forces 1.
fn ws_cluster(g: &GpuDevice, f: &cudarc::driver::CudaFunction, dims: &LaunchDims) -> u32 {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if dims.grid.1 % 2 != 0 || *OFF.get_or_init(|| std::env::var("MLA_WS_CLUSTER").as_deref() == Ok("1")) {
        return 1;
    }
    let pairs = g.max_pair_clusters(|| max_active_clusters(f, g.stream(), dims, (1, 2, 1)));
    let wanted = (dims.grid.0 * dims.grid.1).min(g.info().multiprocessors as u32) / 2;
    if pairs >= wanted {
        2
    } else {
        1
    }
}

#[allow(clippy::too_many_arguments)]
pub fn decode_into(g: &GpuDevice, s: &DecodeShape, inp: &DecodeInputs, opts: &DecodeOptions, out: &mut Tensor, lse: &mut Tensor) -> Result<()> {
    let DecodeInputs { q, kv, block_table, seqlens, plan } = *inp;
    let rows = s.rows();
    if s.b == 0 {
        return Ok(()); // nothing to compute, and a grid of zero blocks is a launch error
    }
    let ws = plan.workspace.as_ref().expect("a CUDA plan has a workspace");
    let slots = plan.slots as u64;
    let stream = pick_stream(g, &opts.stream);
    let scale = opts.scale();
    let kernel = DecodeKernel::for_rows(rows, g.kernel_path(), g.portable_max_tile());
    let tile = kernel.tile();
    let (entry, threads) = kernel.entry(s.dtype);
    let (f, smem) = g.kernels().function(entry)?;
    let (fc, _) = g.kernels().function(if s.dtype == DType::BF16 { k::MLA_COMBINE_BF16 } else { k::MLA_COMBINE_FP16 })?;
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
        DecodeKernel::Tma { tile } => {
            MlaDecodeParams { q_map: tma::q_map(p.q, s.dtype, s.b, rows, tile)?, kv_map: tma::kv_map(p.kv, s.dtype, s.num_blocks, BLOCK_SIZE / 2)?, ..p }
        }
        DecodeKernel::WarpSpecialized => {
            MlaDecodeParams { q_map: tma::q_map(p.q, s.dtype, s.b, rows, GPU_ROW_TILE)?, kv_map: tma::kv_map(p.kv, s.dtype, s.num_blocks, BLOCK_SIZE)?, ..p }
        }
        _ => p,
    };
    let dims = LaunchDims { grid: (plan.num_parts as u32, rows.div_ceil(tile) as u32, 1), block: (threads, 1, 1), smem };
    match kernel {
        DecodeKernel::WarpSpecialized if ws_cluster(g, &f, &dims) == 2 => unsafe { launch_cluster(&f, stream, &dims, (1, 2, 1), &p)? },
        _ => unsafe { launch(&f, stream, &dims, &p)? },
    }

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
