//! The CPU backend: the whole decode contract on host memory, multi-threaded with rayon,
//! following the same split-KV plan as the GPU (parts, partial results, combine).

use crate::validate::DecodeShape;

/// Everything one CPU decode step reads. Slices are the tensors' host elements
/// (bf16 / fp16 as raw bits).
pub struct CpuDecodeArgs<'a> {
    pub shape: DecodeShape,
    pub q: &'a [u16],
    pub kv: &'a [u16],
    pub block_table: &'a [i32],
    pub seqlens: &'a [i32],
    pub metadata: &'a [i32],
    pub num_splits: &'a [i32],
    pub num_parts: usize,
    pub causal: bool,
    pub scale: f32,
}

/// Writes out [b, s_q, h_q, 512] (q's dtype, as bits) and lse [b, h_q, s_q].
/// Inputs were validated (lengths and read block indices are in range).
pub fn decode(args: &CpuDecodeArgs, out: &mut [u16], lse: &mut [f32]) {
    let _ = (args, out, lse);
    todo!("CPU decode")
}
