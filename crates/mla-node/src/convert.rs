//! Element conversions (round-to-nearest-even), done natively over whole arrays.

use mla_core::dtype::{f32_slice_to_half, half_slice_to_f32};
use mla_core::DType;
use napi::bindgen_prelude::*;
use napi_derive::napi;

/// f32 -> bf16 bit patterns (round to nearest even).
#[napi(js_name = "f32ToBf16")]
pub fn f32_to_bf16(data: &[f32]) -> Uint16Array {
    Uint16Array::new(f32_slice_to_half(data, DType::BF16))
}

/// bf16 bit patterns -> f32 (exact).
#[napi(js_name = "bf16ToF32")]
pub fn bf16_to_f32(bits: &[u16]) -> Float32Array {
    Float32Array::new(half_slice_to_f32(bits, DType::BF16))
}

/// f32 -> fp16 bit patterns (round to nearest even).
#[napi(js_name = "f32ToF16")]
pub fn f32_to_f16(data: &[f32]) -> Uint16Array {
    Uint16Array::new(f32_slice_to_half(data, DType::F16))
}

/// fp16 bit patterns -> f32 (exact).
#[napi(js_name = "f16ToF32")]
pub fn f16_to_f32(bits: &[u16]) -> Float32Array {
    Float32Array::new(half_slice_to_f32(bits, DType::F16))
}
