//! Argument checks done before anything is launched (the contract's "Bad input").

use crate::consts::{BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{ErrorCode, MlaError, Result};
use crate::step::plan::Plan;
use crate::tensor::Tensor;

pub use crate::step::shape::DecodeShape;

fn shape_err(arg: &str, expected: impl std::fmt::Display, t: &Tensor) -> MlaError {
    MlaError::arg(ErrorCode::ShapeMismatch, arg, expected, format!("{:?}", t.shape()))
}

fn want_dtype(arg: &str, t: &Tensor, d: DType) -> Result<()> {
    if t.dtype() != d {
        return Err(MlaError::arg(ErrorCode::DtypeMismatch, arg, d, t.dtype()));
    }
    Ok(())
}

fn want_device(arg: &str, t: &Tensor, dev: &Device) -> Result<()> {
    if !t.device().same(dev) {
        return Err(MlaError::arg(ErrorCode::DeviceMismatch, arg, format!("a tensor on {:?} (where q is)", dev), format!("{:?}", t.device())));
    }
    Ok(())
}

/// Checks shapes, dtypes, devices, d / dv / block_size / h_kv and the plan. On the CPU
/// backend it also checks every length and every block index that will be read; on CUDA
/// those live on the device and the kernels check them there.
pub fn check_decode(q: &Tensor, kv: &Tensor, block_table: &Tensor, seqlens: &Tensor, plan: &Plan) -> Result<DecodeShape> {
    let dev = q.device().clone();
    if q.shape().len() != 4 {
        return Err(shape_err("q", "rank 4 [b, s_q, h_q, 576]", q));
    }
    if !q.dtype().is_half() {
        return Err(MlaError::arg(ErrorCode::DtypeMismatch, "q", "bf16 or fp16", q.dtype()));
    }
    let (b, s_q, h_q, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    if d != HEAD_DIM {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "q head dim (d)", HEAD_DIM, d));
    }
    if s_q == 0 || h_q == 0 {
        return Err(MlaError::arg(ErrorCode::ShapeMismatch, "q", "s_q >= 1 and h_q >= 1", format!("{:?}", q.shape())));
    }
    want_device("kv_cache", kv, &dev)?;
    if kv.shape().len() != 4 {
        return Err(shape_err("kv_cache", "rank 4 [num_blocks, 64, h_kv, 576]", kv));
    }
    want_dtype("kv_cache", kv, q.dtype())?;
    let (num_blocks, block_size, h_kv, dk) = (kv.shape()[0], kv.shape()[1], kv.shape()[2], kv.shape()[3]);
    if block_size != BLOCK_SIZE {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "kv_cache block_size", BLOCK_SIZE, block_size));
    }
    if dk != HEAD_DIM {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "kv_cache head dim (d)", HEAD_DIM, dk));
    }
    if h_kv != 1 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "kv_cache h_kv", 1, h_kv));
    }
    if h_q % h_kv != 0 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "h_q", format!("a multiple of h_kv = {h_kv}"), h_q));
    }
    want_device("block_table", block_table, &dev)?;
    want_dtype("block_table", block_table, DType::I32)?;
    if block_table.shape().len() != 2 || block_table.shape()[0] != b {
        return Err(shape_err("block_table", format!("[{b}, max_blocks_per_seq]"), block_table));
    }
    let max_blocks_per_seq = block_table.shape()[1];
    want_device("cache_seqlens", seqlens, &dev)?;
    want_dtype("cache_seqlens", seqlens, DType::I32)?;
    if seqlens.shape() != [b] {
        return Err(shape_err("cache_seqlens", format!("[{b}]"), seqlens));
    }
    if !plan.device().same(&dev) {
        return Err(MlaError::arg(ErrorCode::DeviceMismatch, "plan", format!("{:?}", dev), format!("{:?}", plan.device())));
    }
    let shape = DecodeShape { b, s_q, h_q, h_kv, num_blocks, max_blocks_per_seq, dtype: q.dtype() };
    check_limits(&shape)?;
    if plan.batch != b || plan.rows != shape.rows() {
        return Err(MlaError::arg(
            ErrorCode::InvalidArgument,
            "plan",
            format!("a plan for b = {b} and s_q * h_q / h_kv = {}", shape.rows()),
            format!("b = {}, rows = {}", plan.batch, plan.rows),
        ));
    }
    if let (Some(lens), Some(bt)) = (seqlens.host(), block_table.host()) {
        check_host_indices(&shape, lens.as_i32(), bt.as_i32())?;
    }
    Ok(shape)
}

/// Sizes the kernels index with 32-bit ints and launch grids over (b parts of a grid's x,
/// h_q * s_q / 8 rows of its y): checked for both backends, so that a shape is valid or
/// not whatever runs it.
fn check_limits(s: &DecodeShape) -> Result<()> {
    const MAX_ROWS: usize = 8 * 65535;
    let i32_max = i32::MAX as usize;
    if s.rows() > MAX_ROWS {
        return Err(MlaError::arg(ErrorCode::ShapeMismatch, "q", format!("h_q * s_q / h_kv <= {MAX_ROWS}"), s.rows()));
    }
    if s.b > i32_max || s.num_blocks.saturating_mul(BLOCK_SIZE) > i32_max || s.max_blocks_per_seq.saturating_mul(BLOCK_SIZE) > i32_max {
        return Err(MlaError::arg(
            ErrorCode::ShapeMismatch,
            "sizes",
            "b, num_blocks * 64 and max_blocks_per_seq * 64 below 2^31",
            format!("b = {}, num_blocks = {}, max_blocks_per_seq = {}", s.b, s.num_blocks, s.max_blocks_per_seq),
        ));
    }
    Ok(())
}

/// Lengths within [0, max_blocks_per_seq * 64] and every block index that will be read
/// within [0, num_blocks). Entries past a sequence's blocks are never looked at.
pub fn check_host_indices(s: &DecodeShape, seqlens: &[i32], block_table: &[i32]) -> Result<()> {
    let max_len = s.max_blocks_per_seq * BLOCK_SIZE;
    for (i, &l) in seqlens.iter().enumerate() {
        if l < 0 || l as usize > max_len {
            return Err(MlaError::arg(ErrorCode::SeqlenOutOfRange, &format!("cache_seqlens[{i}]"), format!("within [0, {max_len}]"), l));
        }
        let used = (l as usize).div_ceil(BLOCK_SIZE);
        for j in 0..used {
            let idx = block_table[i * s.max_blocks_per_seq + j];
            if idx < 0 || idx as usize >= s.num_blocks {
                return Err(MlaError::arg(
                    ErrorCode::BlockIndexOutOfRange,
                    &format!("block_table[{i}][{j}]"),
                    format!("a block index within [0, {})", s.num_blocks),
                    idx,
                ));
            }
        }
    }
    Ok(())
}

/// Checks caller-provided outputs of `decode_into`.
pub fn check_outputs(s: &DecodeShape, dev: &Device, out: &Tensor, lse: &Tensor) -> Result<()> {
    want_device("out", out, dev)?;
    want_device("lse", lse, dev)?;
    want_dtype("out", out, s.dtype)?;
    want_dtype("lse", lse, DType::F32)?;
    if out.shape() != [s.b, s.s_q, s.h_q, HEAD_DIM_V] {
        return Err(shape_err("out", format!("[{}, {}, {}, {}]", s.b, s.s_q, s.h_q, HEAD_DIM_V), out));
    }
    if lse.shape() != [s.b, s.h_q, s.s_q] {
        return Err(shape_err("lse", format!("[{}, {}, {}]", s.b, s.h_q, s.s_q), lse));
    }
    Ok(())
}

pub fn check_scale(scale: f32) -> Result<()> {
    if !scale.is_finite() || scale <= 0.0 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "softmax_scale", "a finite value > 0", scale));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Integer arguments of callers that hold 64-bit numbers (the Node binding passes JS
// numbers as i64): the core's range checks, named as the caller names the argument, with
// the messages the API documents (`name: expected ..., got v`). The binding maps its
// arguments to these and checks nothing of its own.

/// `v` within `[lo, hi]` ("an integer within [lo, hi]"), as usize. `ERR_INVALID_ARGUMENT`.
pub fn int_within(name: &str, v: i64, lo: i64, hi: i64) -> Result<usize> {
    if !(lo..=hi).contains(&v) || v < 0 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, name, format!("an integer within [{lo}, {hi}]"), v));
    }
    Ok(v as usize)
}

/// `v >= lo` ("at least lo"), as usize (`lo >= 0`). `ERR_INVALID_ARGUMENT`.
pub fn int_at_least(name: &str, v: i64, lo: i64) -> Result<usize> {
    if v < lo || v < 0 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, name, format!("at least {lo}"), v));
    }
    Ok(v as usize)
}

/// A step id (>= 1). `ERR_INVALID_ARGUMENT`.
pub fn step_id(v: i64) -> Result<u64> {
    if v < 1 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "step", "a step id (>= 1)", v));
    }
    Ok(v as u64)
}

/// Tensor extents, each within [0, 2^32 - 1]. `ERR_SHAPE`.
pub fn extents(shape: &[i64]) -> Result<Vec<usize>> {
    if shape.iter().any(|&d| d < 0 || d > u32::MAX as i64) {
        return Err(MlaError::arg(ErrorCode::ShapeMismatch, "shape", format!("extents within [0, {}]", u32::MAX), format!("{shape:?}")));
    }
    Ok(shape.iter().map(|&d| d as usize).collect())
}

/// The query rows per KV head of a plan, `s_q * h_q / h_kv`, from the three head counts
/// (each at least 1, `s_q * h_q` at most 2^32 - 1). `ERR_INVALID_ARGUMENT`.
pub fn plan_rows(s_q: i64, h_q: i64, h_kv: i64) -> Result<usize> {
    for (name, v) in [("s_q", s_q), ("h_q", h_q), ("h_kv", h_kv)] {
        int_at_least(name, v, 1)?;
    }
    match s_q.checked_mul(h_q) {
        Some(r) if r <= u32::MAX as i64 => Ok((r / h_kv) as usize),
        _ => Err(MlaError::arg(ErrorCode::InvalidArgument, "s_q * h_q", format!("at most {}", u32::MAX), format!("{s_q} * {h_q}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_arguments_keep_their_messages() {
        assert_eq!(int_within("numBlocks", 0, 1, 9).unwrap_err().message, "numBlocks: expected an integer within [1, 9], got 0");
        assert_eq!(int_within("numBlocks", 9, 1, 9).unwrap(), 9);
        assert_eq!(int_at_least("h_q", 0, 1).unwrap_err().message, "h_q: expected at least 1, got 0");
        assert_eq!(step_id(0).unwrap_err().message, "step: expected a step id (>= 1), got 0");
        assert_eq!(extents(&[2, -1]).unwrap_err().message, "shape: expected extents within [0, 4294967295], got [2, -1]");
        assert_eq!(extents(&[2, 3]).unwrap(), vec![2, 3]);
        assert_eq!(plan_rows(2, 16, 1).unwrap(), 32);
        assert_eq!(plan_rows(1 << 20, 1 << 20, 1).unwrap_err().message, format!("s_q * h_q: expected at most 4294967295, got {} * {}", 1 << 20, 1 << 20));
        assert_eq!(plan_rows(1, 1, 0).unwrap_err().code, ErrorCode::InvalidArgument);
    }
}
