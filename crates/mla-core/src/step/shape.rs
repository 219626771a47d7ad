//! The sizes of one decode step, once checked (`validate::check_decode` makes them), and
//! the tensors it reads: what `decode` hands to either backend.

use crate::dtype::DType;
use crate::step::plan::Plan;
use crate::tensor::Tensor;

/// The sizes of one decode call, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeShape {
    pub b: usize,
    pub s_q: usize,
    pub h_q: usize,
    pub h_kv: usize,
    pub num_blocks: usize,
    pub max_blocks_per_seq: usize,
    pub dtype: DType,
}

impl DecodeShape {
    /// Query rows per sequence and KV head.
    pub fn rows(&self) -> usize {
        self.s_q * self.h_q / self.h_kv
    }
}

/// The tensors one decode step reads, checked against a [`DecodeShape`]: the same
/// arguments for the CPU backend (`cpu::decode_into`) and the CUDA one
/// (`gpu::ops::decode_into`).
#[derive(Clone, Copy)]
pub struct DecodeInputs<'a> {
    pub q: &'a Tensor,
    pub kv: &'a Tensor,
    pub block_table: &'a Tensor,
    pub seqlens: &'a Tensor,
    pub plan: &'a Plan,
}
