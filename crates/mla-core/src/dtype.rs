//! Element types and the scalar conversions the CPU backend and the bindings use.

use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    BF16,
    F16,
    F32,
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F16 => "fp16",
            DType::F32 => "fp32",
            DType::I32 => "int32",
        }
    }
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "bf16" | "bfloat16" => Some(DType::BF16),
            "fp16" | "f16" | "float16" => Some(DType::F16),
            "fp32" | "f32" | "float32" => Some(DType::F32),
            "int32" | "i32" => Some(DType::I32),
            _ => None,
        }
    }
    /// A 16-bit floating type, usable for q, the cache and out.
    pub fn is_half(self) -> bool {
        matches!(self, DType::BF16 | DType::F16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Round-to-nearest-even f32 -> 16-bit bits of `dtype` (bf16 or fp16).
#[inline]
pub fn f32_to_half_bits(x: f32, dtype: DType) -> u16 {
    match dtype {
        DType::BF16 => bf16::from_f32(x).to_bits(),
        DType::F16 => f16::from_f32(x).to_bits(),
        _ => unreachable!("not a 16-bit float type"),
    }
}

#[inline]
pub fn half_bits_to_f32(bits: u16, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_bits(bits).to_f32(),
        DType::F16 => f16::from_bits(bits).to_f32(),
        _ => unreachable!("not a 16-bit float type"),
    }
}

pub fn f32_slice_to_half(src: &[f32], dtype: DType) -> Vec<u16> {
    let mut dst = vec![0u16; src.len()];
    f32_slice_to_half_into(src, &mut dst, dtype);
    dst
}

/// [`f32_slice_to_half`] into `dst` (same length): the bulk conversion of host rows
/// (`KvCache::append_batch_f32` writes straight into its staging memory with it). Bit for
/// bit what [`f32_to_half_bits`] gives for every input, NaNs included; bf16 runs as a
/// branch-free loop the compiler vectorises (with AVX2 where the CPU has it), fp16 through
/// `half`'s slice conversion (F16C where available).
pub fn f32_slice_to_half_into(src: &[f32], dst: &mut [u16], dtype: DType) {
    assert_eq!(src.len(), dst.len(), "f32_slice_to_half_into: slices of different lengths");
    match dtype {
        DType::BF16 => f32_to_bf16_slice(src, dst),
        DType::F16 => {
            use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
            dst.reinterpret_cast_mut::<f16>().convert_from_f32_slice(src)
        }
        _ => unreachable!("not a 16-bit float type"),
    }
}

/// f32 -> bf16 bits, round to nearest even, NaNs quieted: `half::bf16::from_f32` without
/// its branches (the rounding bias is 0x7fff plus the result's lowest bit).
#[inline(always)]
fn f32_to_bf16_branchless(x: f32) -> u16 {
    let x = x.to_bits();
    let nan = ((x >> 16) | 0x0040) as u16;
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

#[inline(always)]
fn f32_to_bf16_loop(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16_branchless(s);
    }
}

fn f32_to_bf16_slice(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(src: &[f32], dst: &mut [u16]) {
            f32_to_bf16_loop(src, dst)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { avx2(src, dst) };
        }
    }
    f32_to_bf16_loop(src, dst)
}

pub fn half_slice_to_f32(src: &[u16], dtype: DType) -> Vec<f32> {
    src.iter().map(|&b| half_bits_to_f32(b, dtype)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bulk conversion equals the scalar one bit for bit: every upper half-word with
    /// the lower half-words where rounding decides (ties, just above and below), plus
    /// pseudo-random patterns. (Checked exhaustively over all 2^32 inputs once by hand.)
    #[test]
    fn bulk_f32_to_half_equals_the_scalar_conversion() {
        let lows: [u32; 12] = [0, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x0040, 0x7ffe, 0x8002, 0xfffe, 0x1234, 0xc000];
        let mut src: Vec<f32> = (0..=0xffffu32).flat_map(|hi| lows.iter().map(move |&lo| f32::from_bits(hi << 16 | lo))).collect();
        let mut s = 0x9e37_79b9u32;
        src.extend((0..100_000).map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            f32::from_bits(s)
        }));
        for dtype in [DType::BF16, DType::F16] {
            let want: Vec<u16> = src.iter().map(|&x| f32_to_half_bits(x, dtype)).collect();
            // Odd lengths and offsets too (the vector loop's tail).
            for (a, b) in [(0, src.len()), (3, src.len() - 5), (1, 8)] {
                let mut got = vec![0u16; b - a];
                f32_slice_to_half_into(&src[a..b], &mut got, dtype);
                if let Some(i) = (0..got.len()).find(|&i| got[i] != want[a + i]) {
                    panic!("{dtype}: {:#010x} -> {:#06x}, want {:#06x}", src[a + i].to_bits(), got[i], want[a + i]);
                }
            }
        }
    }
}
