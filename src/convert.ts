/** Element conversions (round to nearest even), computed natively over whole arrays. */

import { want } from './check'
import { call } from './errors'
import { native } from './native'

/** f32 values -> bf16 bit patterns (round to nearest even), computed natively. */
export function f32ToBf16(data: Float32Array): Uint16Array {
  return call(() => native.f32ToBf16(want(data, Float32Array, 'data')))
}
/** bf16 bit patterns -> f32 values (exact), computed natively. */
export function bf16ToF32(bits: Uint16Array): Float32Array {
  return call(() => native.bf16ToF32(want(bits, Uint16Array, 'bits')))
}
/** f32 values -> fp16 bit patterns (round to nearest even), computed natively. */
export function f32ToF16(data: Float32Array): Uint16Array {
  return call(() => native.f32ToF16(want(data, Float32Array, 'data')))
}
/** fp16 bit patterns -> f32 values (exact), computed natively. */
export function f16ToF32(bits: Uint16Array): Float32Array {
  return call(() => native.f16ToF32(want(bits, Uint16Array, 'bits')))
}
