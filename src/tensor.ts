/** `Tensor`: a dense, row-major tensor on a device, or a view of one (a cache's pool, a plan's metadata). */

import type * as Native from '../binding'
import { describe, want } from './check'
import { call, callAsync, fail } from './errors'
import { Device, deviceName, type DType } from './device'
import { Handle } from './handle'
import { native } from './native'
import { Plan } from './plan'

/**
 * A dense, row-major tensor on a device. Created by {@link Device.tensor}, returned by
 * {@link decode}, {@link KvCache.batch}, {@link Plan}, or a view of a cache's pool
 * ({@link KvCache.tensor}). Memory is freed once the handle is disposed (or garbage
 * collected) and no pending operation uses it. Any use after {@link dispose} throws
 * `ERR_DISPOSED`.
 */
export class Tensor extends Handle {
  /** @internal */
  declare readonly _n: Native.Tensor
  /** The native tensor's id (0 until first used), see {@link _id}. */
  private _nid = 0

  private constructor(n: Native.Tensor) {
    super(n)
  }

  /**
   * @internal The native tensor's id, which the hot native calls (the decodes, `Plan.update`)
   * take instead of the object: converting a native object argument costs napi-rs about
   * 0.3 µs, a number next to nothing. Registered on first use, one id for the native
   * object's life; the id of a disposed tensor stays valid and its use throws `ERR_DISPOSED`.
   */
  _id(): number {
    return this._nid || (this._nid = call(() => native.tensorId(this._n)))
  }

  /** Extents, outermost first. */
  get shape(): number[] {
    return call(() => this._n.shape)
  }

  /** Element type. */
  get dtype(): DType {
    return call(() => this._n.dtype) as DType
  }

  /** The device that holds the memory. */
  get device(): Device {
    return Device._wrap(call(() => this._n.device))
  }

  /** The CUDA device pointer, for interop with other CUDA code; `null` on the CPU backend. */
  get devicePtr(): bigint | null {
    return call(() => this._n.devicePtr) ?? null
  }

  /** Size in bytes. */
  get nbytes(): number {
    return call(() => this._n.nbytes)
  }

  /** `'owned'`, `'cache'` (a view of a {@link KvCache} pool), `'plan'` (a {@link Plan}'s metadata) or `'step'` (a {@link CapturedStep}'s tensor). */
  get storage(): 'owned' | 'cache' | 'plan' | 'step' {
    return call(() => this._n.storage) as 'owned' | 'cache' | 'plan' | 'step'
  }

  /** Values as f32 (bf16 / fp16 widened exactly), copied to the host off the JS thread. */
  toFloat32Array(): Promise<Float32Array> {
    return callAsync(() => call(() => this._n.toFloat32Array()) as Promise<Float32Array>)
  }
  /** Values of an int32 tensor. */
  toInt32Array(): Promise<Int32Array> {
    return callAsync(() => call(() => this._n.toInt32Array()) as Promise<Int32Array>)
  }
  /** Raw bf16 / fp16 bit patterns of a 16-bit float tensor. */
  toUint16Array(): Promise<Uint16Array> {
    return callAsync(() => call(() => this._n.toUint16Array()) as Promise<Uint16Array>)
  }
  /** {@link toFloat32Array} on the calling thread. */
  toFloat32ArraySync(): Float32Array {
    return call(() => this._n.toFloat32ArraySync())
  }
  /** {@link toInt32Array} on the calling thread. */
  toInt32ArraySync(): Int32Array {
    return call(() => this._n.toInt32ArraySync())
  }
  /** {@link toUint16Array} on the calling thread. */
  toUint16ArraySync(): Uint16Array {
    return call(() => this._n.toUint16ArraySync())
  }

  /**
   * Sets every byte to `byte` (0xFF is NaN in every float type). Only for tensors of their
   * own (`storage === 'owned'`) that no pending operation is reading.
   */
  fill(byte: number): void {
    if (!Number.isInteger(byte) || byte < 0 || byte > 255)
      fail('ERR_INVALID_ARGUMENT', `byte: expected an integer in 0..255, got ${String(byte)}`)
    call(() => this._n.fill(byte))
  }

  /**
   * Overwrites the whole tensor from host data, in place (no allocation): a `Float32Array`
   * is rounded to the tensor's dtype (bf16, fp16, fp32), a `Uint16Array` holds raw bf16 /
   * fp16 bits, an `Int32Array` fills an int32 tensor. `data.length` must equal the element
   * count. On CUDA the copy is queued (staged in pinned memory) and this returns at once;
   * work queued earlier that reads the tensor still sees the old values. Only for tensors
   * of their own that no pending operation is reading.
   */
  write(data: Float32Array | Uint16Array | Int32Array): void {
    if (data instanceof Float32Array) return call(() => this._n.writeF32(data))
    if (data instanceof Uint16Array) return call(() => this._n.writeBits(data))
    if (data instanceof Int32Array) return call(() => this._n.writeI32(data))
    fail('ERR_INVALID_ARGUMENT', `data: expected a Float32Array, Uint16Array or Int32Array, got ${describe(data)}`)
  }

  /**
   * Overwrites this tensor with `src`'s bytes (same device, same byte size): on CUDA a
   * device-to-device copy, queued. E.g. the model's queries or new latent rows, with no host
   * round trip.
   */
  copyFrom(src: Tensor): void {
    const s = want(src, Tensor, 'src')
    if (s._n === this._n) fail('ERR_INVALID_ARGUMENT', 'src: expected another tensor, got this one')
    call(() => this._n.copyFrom(s._n))
  }

  /** Whether both handles view the same memory. */
  sameStorage(other: Tensor): boolean {
    return call(() => this._n.sameStorage(want(other, Tensor, 'other')._n))
  }

  /** Releases this handle's reference to the memory. */
  override dispose(): void {
    super.dispose()
  }

  /** @internal */
  _inspect(): Record<string, unknown> {
    return { shape: this.shape, dtype: this.dtype, device: deviceName(this.device), storage: this.storage, nbytes: this.nbytes }
  }

  /** @internal */
  _sourcePlan(): Plan | null {
    const p = call(() => this._n.sourcePlan())
    return p ? Plan._wrap(p) : null
  }
}
