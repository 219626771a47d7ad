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
    src.iter().map(|&x| f32_to_half_bits(x, dtype)).collect()
}

pub fn half_slice_to_f32(src: &[u16], dtype: DType) -> Vec<f32> {
    src.iter().map(|&b| half_bits_to_f32(b, dtype)).collect()
}
