//! The contract's sizes and limits, from `mla_core::consts`: the TS entry reads them here
//! (src/constants.ts, src/check.ts) instead of restating them.

use napi_derive::napi;

use mla_core::consts::{BLOCK_SIZE, BLOCK_TABLE_PAD, HEAD_DIM, HEAD_DIM_V};

/// The fixed sizes of MLA decoding and the limits the core checks against.
#[napi(object)]
pub struct Constants {
    /// Latent width of one cached token (576).
    pub head_dim: u32,
    /// Width of V and of `out` (512).
    pub head_dim_v: u32,
    /// Tokens per cache block (64).
    pub block_size: u32,
    /// The block-table pad value, also the largest pool a cache may have (i32::MAX - 4095).
    pub block_table_pad: i32,
}

/// See [`Constants`].
#[napi]
pub fn constants() -> Constants {
    Constants { head_dim: HEAD_DIM as u32, head_dim_v: HEAD_DIM_V as u32, block_size: BLOCK_SIZE as u32, block_table_pad: BLOCK_TABLE_PAD }
}
