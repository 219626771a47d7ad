//! The benchmark's inputs: random tensors (on the device on CUDA) and block tables that
//! give each sequence its own blocks.

use rayon::prelude::*;

use crate::bench::rng::splitmix;
use crate::consts::{BLOCK_SIZE, BLOCK_TABLE_PAD};
use crate::device::Device;
use crate::dtype::{f32_to_half_bits, DType};
use crate::error::{ErrorCode, MlaError, Result};
use crate::tensor::Tensor;

/// A bf16 / fp16 tensor of approximately Normal(0, std) values clamped to [-clamp, clamp]:
/// generated on the device on CUDA; on the CPU with SplitMix64 and an Irwin-Hall sum of
/// four uniforms, in parallel.
pub fn random_tensor(dev: &Device, shape: &[usize], dtype: DType, seed: u64, std: f32, clamp: f32) -> Result<Tensor> {
    if !dtype.is_half() {
        return Err(MlaError::arg(ErrorCode::DtypeMismatch, "dtype", "bf16 or fp16", dtype));
    }
    let mut t = Tensor::zeros(dev, shape, dtype)?;
    match dev {
        Device::Cuda(_) => crate::gpu::util::fill_random(&mut t, seed, std, clamp)?,
        Device::Cpu => {
            const CHUNK: usize = 1 << 16;
            let scale = std * 3f32.sqrt() / 65536.0;
            t.host_mut().unwrap().as_u16_mut().par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
                let mut s = seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
                for x in chunk.iter_mut() {
                    let r = splitmix(&mut s);
                    let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
                    // sum/65536 - 2 has variance 1/3: times sqrt(3) is ~N(0, 1).
                    let v = (sum as f32 - 131070.0) * scale;
                    *x = f32_to_half_bits(if clamp > 0.0 { v.clamp(-clamp, clamp) } else { v }, dtype);
                }
            });
        }
    }
    Ok(t)
}

/// Block table mapping each sequence to its own consecutive blocks; entries past a
/// sequence's blocks hold a padding value that is never read. Returns (table, max blocks
/// per sequence, total blocks).
pub fn own_blocks_table(seqlens: &[i32]) -> (Vec<i32>, usize, usize) {
    let nb: Vec<usize> = seqlens.iter().map(|&l| (l.max(0) as usize).div_ceil(BLOCK_SIZE)).collect();
    let max_nb = nb.iter().copied().max().unwrap_or(0).max(1);
    let total: usize = nb.iter().sum();
    let mut table = vec![BLOCK_TABLE_PAD; seqlens.len() * max_nb];
    let mut next = 0i32;
    for (i, &n) in nb.iter().enumerate() {
        for j in 0..n {
            table[i * max_nb + j] = next;
            next += 1;
        }
    }
    (table, max_nb, total)
}
