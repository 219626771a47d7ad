//! Tensor maps for the TMA kernels (`kernels/sm90/tma.cuh`): the host-side description of
//! q and the KV cache that the copy engine reads by box. Encoded per launch (host work
//! only, about a microsecond) and passed by value inside the parameter block; a graph
//! captures them by value, so the tensors must stay where they are across replays (as
//! every pointer of a captured step must).

use cudarc::driver::sys;

use super::params::TmaMap;
use crate::consts::{BLOCK_SIZE, HEAD_DIM};
use crate::dtype::DType;
use crate::error::{ErrorCode, MlaError, Result};

/// Columns of one TMA box: 64 two-byte values = the 128 bytes the 128-byte swizzle spans,
/// so each box lands as one swizzled column region of the kernels' shared-memory layout.
pub const BOX_COLS: u32 = 64;

fn data_type(dtype: DType) -> sys::CUtensorMapDataType {
    match dtype {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    }
}

/// L2 promotion of the boxes' reads: none (measured on the H200: 256-byte promotion cost
/// 5-7% of the read rate; BENCHMARKS.md). MLA_TMA_L2_PROMOTION=64|128|256 overrides it,
/// for measuring.
fn l2_promotion() -> sys::CUtensorMapL2promotion {
    use sys::CUtensorMapL2promotion::*;
    match std::env::var("MLA_TMA_L2_PROMOTION").as_deref() {
        Ok("64") => CU_TENSOR_MAP_L2_PROMOTION_L2_64B,
        Ok("128") => CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
        Ok("256") => CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        _ => CU_TENSOR_MAP_L2_PROMOTION_NONE,
    }
}

/// A rank-3 map over a contiguous [dims[2]][dims[1]][576] tensor of two-byte values,
/// boxes of 64 columns x `box_rows` rows x 1, 128-byte swizzle. Boxes that reach past the
/// tensor (rows past the end) are zero-filled by the copy engine, never read.
fn encode_rows(ptr: u64, dtype: DType, dims: [u64; 3], box_rows: u32) -> Result<TmaMap> {
    let row_bytes = (HEAD_DIM * 2) as u64;
    let global_dim = dims;
    let global_strides = [row_bytes, row_bytes * dims[1]];
    let box_dim = [BOX_COLS, box_rows, 1];
    let element_strides = [1u32; 3];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array has the rank's length; the driver only writes `map`.
    let rc = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type(dtype),
            3,
            ptr as *mut std::ffi::c_void,
            global_dim.as_ptr(),
            global_strides.as_ptr(),
            box_dim.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            l2_promotion(),
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if rc != sys::CUresult::CUDA_SUCCESS {
        return Err(MlaError::new(ErrorCode::Cuda, format!("cuTensorMapEncodeTiled({dims:?}, box {BOX_COLS}x{box_rows}) failed: {rc:?}")));
    }
    // SAFETY: initialised by the driver above.
    let map = unsafe { map.assume_init() };
    Ok(TmaMap(map.opaque))
}

/// q as [b][rows][576], boxes of `tile_rows` rows (rows past `rows` read as zeros).
pub fn q_map(ptr: u64, dtype: DType, b: usize, rows: usize, tile_rows: usize) -> Result<TmaMap> {
    encode_rows(ptr, dtype, [HEAD_DIM as u64, rows as u64, b as u64], tile_rows as u32)
}

/// The KV cache as [num_blocks][64][576], boxes of `box_rows` tokens of one block.
pub fn kv_map(ptr: u64, dtype: DType, num_blocks: usize, box_rows: usize) -> Result<TmaMap> {
    encode_rows(ptr, dtype, [HEAD_DIM as u64, BLOCK_SIZE as u64, num_blocks as u64], box_rows as u32)
}
