//! Mirrors of `kernels/common/mla_params.cuh`, field for field.

use cudarc::driver::DeviceRepr;

pub const MLA_ERR_BLOCK_INDEX: i32 = 1;
pub const MLA_ERR_SEQLEN: i32 = 2;
pub const MLA_ERR_PLAN: i32 = 4;

/// A `CUtensorMap` (`mla::TmaMap` in `kernels/common/mla_tma_map.cuh`): 128 opaque bytes, 64-byte
/// aligned, encoded by [`super::tma`]. All zero for kernels that do not use it.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Default)]
pub struct TmaMap(pub [u64; 16]);

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MlaPlanParams {
    pub seqlens: u64,
    pub metadata: u64,
    pub num_splits: u64,
    pub plan_seqlens: u64,
    pub error_flag: u64,
    pub b: i32,
    pub num_parts: i32,
    pub block_size: i32,
    pub fixed_cost: i32,
    pub max_seqlen: i32,
    /// A batch-invariant plan's chunk rule (0, 0: the default plan).
    pub chunk_blocks: i32,
    pub max_chunks: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MlaDecodeParams {
    pub q: u64,
    pub kv: u64,
    pub block_table: u64,
    pub seqlens: u64,
    pub out: u64,
    pub lse: u64,
    pub oaccum: u64,
    pub lseaccum: u64,
    pub metadata: u64,
    pub num_splits: u64,
    pub error_flag: u64,
    pub b: i32,
    pub s_q: i32,
    pub h_q: i32,
    pub rows: i32,
    pub num_blocks: i32,
    pub max_blocks_per_seq: i32,
    pub num_parts: i32,
    pub causal: i32,
    pub scale: f32,
    pub scale_log2: f32,
    /// A batch-invariant plan's chunk rule (0, 0: the default plan).
    pub chunk_blocks: i32,
    pub max_chunks: i32,
    pub q_map: TmaMap,
    pub kv_map: TmaMap,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MlaCombineParams {
    pub oaccum: u64,
    pub lseaccum: u64,
    pub num_splits: u64,
    pub seqlens: u64,
    pub plan_seqlens: u64,
    pub error_flag: u64,
    pub out: u64,
    pub lse: u64,
    pub b: i32,
    pub s_q: i32,
    pub h_q: i32,
    pub rows: i32,
    pub slots: i32,
}

unsafe impl DeviceRepr for MlaPlanParams {}
unsafe impl DeviceRepr for MlaDecodeParams {}
unsafe impl DeviceRepr for MlaCombineParams {}
