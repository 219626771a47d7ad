/** `Device`: the CPU backend or one CUDA device; and {@link gpuStatus}, whether CUDA is usable. */

import type * as Native from '../binding'
import { checkShape, describe, int, MAX_I32, show, want } from './check'
import { call, callAsync, fail } from './errors'
import { Handle } from './handle'
import { native } from './native'
import { Plan } from './plan'
import { captureStep, type CaptureOptions, type CapturedStep } from './step'
import { Tensor } from './tensor'

/**
 * The kernels a CUDA device runs: `'hopper'` (sm_90a: TMA and wgmma, H100 / H200),
 * `'portable'` (cp.async + mma.sync from a cubin of the device's own architecture: sm_80,
 * sm_86, sm_89, sm_120) or `'portable-ptx'` (the same kernels from the compute_80 PTX,
 * JIT-compiled by the driver when the device is opened: newer GPUs without a cubin, and
 * Hopper when forced).
 */
export type KernelPath = 'hopper' | 'portable' | 'portable-ptx'

/** One visible CUDA device in {@link GpuStatus}. */
export interface GpuDeviceStatus {
  ordinal: number
  name: string
  computeCapability: [number, number]
  /** The path `Device.open('cuda:<ordinal>')` would use (`MLA_FORCE_PORTABLE` included); absent when it cannot be opened (see `reason`). */
  kernelPath?: KernelPath
  /** The target of the modules it would load, e.g. `'sm_90a'`, `'sm_86'`, `'compute_80'`. */
  kernelTarget?: string
  reason?: string
}

/** Whether the CUDA backend can be used on this machine, and why not. */
export interface GpuStatus {
  /** A CUDA device of compute capability 8.0 or newer is visible, has a kernel path, and this build has kernels. */
  available: boolean
  /** CUDA devices visible to the driver (0 without a driver). */
  deviceCount: number
  /** Whether this build carries GPU kernels (a CUDA compiler was present at build time). */
  kernelsBuilt: boolean
  /**
   * The embedded kernel targets: cubins and PTX, e.g.
   * `['sm_80', 'sm_86', 'sm_89', 'sm_90a', 'sm_120', 'compute_80']`; empty without kernels.
   */
  kernelTargets: string[]
  /** Every visible CUDA device and the kernel path it would use (empty without a driver). */
  devices: GpuDeviceStatus[]
  /** The compiler that built the kernels, e.g. `'NVRTC 12.9 + ptxas 12.9.86 (repo .cuda)'`; absent without kernels. */
  kernelsCompiler?: string
  /**
   * The CUDA version the installed driver supports (cuDriverGetVersion), `[major, minor]`,
   * e.g. `[12, 8]`; absent without a driver. Below `[12, 0]` the GPU path throws
   * `ERR_DRIVER_TOO_OLD`.
   */
  driverVersion?: [number, number]
  /** Why the GPU path is unusable, when it is. */
  reason?: string
}

/**
 * Reports whether the CUDA backend is usable. Never throws and never opens a device
 * context beyond initialising the driver.
 *
 * @example
 * ```ts
 * const s = gpuStatus()
 * console.log(s.available ? `${s.deviceCount} GPU(s)` : `CPU only: ${s.reason}`)
 * ```
 */
export function gpuStatus(): GpuStatus {
  const s = call(() => native.gpuStatus())
  const devices = s.devices.map((d) => {
    const r: GpuDeviceStatus = {
      ordinal: d.ordinal,
      name: d.name,
      computeCapability: [d.computeCapability[0] ?? 0, d.computeCapability[1] ?? 0],
    }
    if (d.kernelPath != null) r.kernelPath = d.kernelPath as KernelPath
    if (d.kernelTarget != null) r.kernelTarget = d.kernelTarget
    if (d.reason != null) r.reason = d.reason
    return r
  })
  const r: GpuStatus = {
    available: s.available,
    deviceCount: s.deviceCount,
    kernelsBuilt: s.kernelsBuilt,
    kernelTargets: [...s.kernelTargets],
    devices,
  }
  if (s.kernelsCompiler != null) r.kernelsCompiler = s.kernelsCompiler
  if (s.driverVersion != null) r.driverVersion = [s.driverVersion[0]!, s.driverVersion[1]!]
  if (s.reason != null) r.reason = s.reason
  return r
}

/**
 * Element types: bf16 / fp16 for q, the cache and out; fp32 for lse; int32 for indices.
 *
 * These four are the names the package uses and reports (`tensor.dtype`, `cache.dtype`).
 * Where a dtype name is taken (`device.tensor`, `device.zeros`, `KvCache`), these aliases
 * are accepted as well, for code ported from PyTorch / NumPy: `'bfloat16'` (bf16),
 * `'float16'` and `'f16'` (fp16), `'float32'` and `'f32'` (fp32), `'i32'` (int32).
 * Anything else is `ERR_DTYPE`.
 */
export type DType = 'bf16' | 'fp16' | 'fp32' | 'int32'
/** A 16-bit float type (q, the cache, out). */
export type HalfDType = 'bf16' | 'fp16'

/**
 * Which device to open: `'auto'` (CUDA device 0 when usable, else the CPU backend),
 * `'cpu'`, `'cuda'` (device 0) or `'cuda:<n>'`.
 */
export type DeviceSpec = 'auto' | 'cpu' | 'cuda' | `cuda:${number}`

/** See {@link Device.memoryStats}. Bytes as numbers; CUDA-only fields are 0 on the CPU backend. */
export interface MemoryStats {
  hostTensorBytes: number
  pendingSteps: number
  deviceLiveBytes: number
  deviceLiveBuffers: number
  poolReservedBytes: number
  poolUsedBytes: number
  deviceFreeBytes: number
  /** CUDA: allocations come from the stream-ordered memory pool (false on the CPU backend, or with `MLA_ALLOC=sync`). */
  pooled: boolean
}

/** Static facts about a device. */
export interface DeviceInfo {
  /** The backend. */
  kind: 'cpu' | 'cuda'
  /** GPU name, or "CPU backend (N threads)". */
  name: string
  /** CUDA device ordinal (0 on the CPU backend). */
  ordinal: number
  /** [major, minor]; [0, 0] on the CPU backend. */
  computeCapability: [number, number]
  /** The kernels a CUDA device runs; absent on the CPU backend. */
  kernelPath?: KernelPath
  /** Multiprocessors on CUDA; worker threads on the CPU backend. */
  multiprocessors: number
  /** Bytes of device memory; 0 on the CPU backend. */
  totalMemory: number
}

/** Options of {@link Device.open} (CUDA devices). */
export interface DeviceOpenOptions {
  /**
   * The portable kernels even where the Hopper ones would run (as `MLA_FORCE_PORTABLE=1`):
   * a cubin of the device's architecture when this build has one, else the compute_80 PTX
   * (on an H100 / H200: the PTX, JIT-compiled when the device is opened).
   */
  portable?: boolean
  /** Exactly this path, or a typed error when the device or this build cannot run it. Overrides `portable`. */
  kernelPath?: KernelPath
}

const KERNEL_PATHS: readonly KernelPath[] = ['hopper', 'portable', 'portable-ptx']

/**
 * A compute device: the multi-threaded CPU backend or one CUDA device (compute capability
 * 8.0 or newer: Ampere, Ada, Hopper, Blackwell; see {@link KernelPath}).
 * Tensors, caches and plans are created from a device and keep it alive; disposing the
 * handle only releases this reference.
 *
 * @example
 * ```ts
 * using dev = Device.open()            // CUDA if usable, else CPU
 * console.log(dev.kind, dev.info.name)
 * ```
 */
export class Device extends Handle {
  /** @internal */
  declare readonly _n: Native.Device

  private constructor(n: Native.Device) {
    super(n)
  }

  /**
   * Opens a device. `'cuda'` / `'cuda:<n>'` never fall back to the CPU: without a usable
   * GPU they throw `ERR_GPU_UNAVAILABLE` (or `ERR_KERNELS_UNAVAILABLE` when this build has
   * no kernels). `'auto'` (the default) picks CUDA device 0 when usable, else the CPU.
   *
   * `options` choose the CUDA kernels (then `'auto'` means device 0, never the CPU):
   * `Device.open('cuda', { portable: true })` runs the portable kernels on a Hopper card.
   * A device runs one path per process: asking for another while it is open throws
   * `ERR_INVALID_ARGUMENT`.
   */
  static open(spec: DeviceSpec = 'auto', options?: DeviceOpenOptions): Device {
    if (typeof spec !== 'string') fail('ERR_INVALID_ARGUMENT', `device: expected a string, got ${describe(spec)}`)
    if (options === undefined) return new Device(call(() => native.Device.open(spec)))
    if (options === null || typeof options !== 'object')
      fail('ERR_INVALID_ARGUMENT', `options: expected an object, got ${describe(options)}`)
    const { portable, kernelPath } = options
    if (portable !== undefined && typeof portable !== 'boolean')
      fail('ERR_INVALID_ARGUMENT', `options.portable: expected a boolean, got ${show(portable)}`)
    if (kernelPath !== undefined && !KERNEL_PATHS.includes(kernelPath)) {
      fail(
        'ERR_INVALID_ARGUMENT',
        `options.kernelPath: expected one of ${KERNEL_PATHS.map((p) => `'${p}'`).join(', ')}, got ${show(kernelPath)}`,
      )
    }
    const o: { portable?: boolean; kernelPath?: string } = {}
    if (portable !== undefined) o.portable = portable
    if (kernelPath !== undefined) o.kernelPath = kernelPath
    return new Device(call(() => native.Device.open(spec, o)))
  }

  /** `'cpu'` or `'cuda'`. */
  get kind(): 'cpu' | 'cuda' {
    return call(() => this._n.kind) as 'cpu' | 'cuda'
  }

  /** Name, ordinal, compute capability, multiprocessors, memory. */
  get info(): DeviceInfo {
    const i = call(() => this._n.info)
    return {
      kind: i.kind as 'cpu' | 'cuda',
      name: i.name,
      ordinal: i.ordinal,
      computeCapability: [i.computeCapability[0] ?? 0, i.computeCapability[1] ?? 0],
      ...(i.kernelPath != null ? { kernelPath: i.kernelPath as KernelPath } : {}),
      multiprocessors: i.multiprocessors,
      totalMemory: i.totalMemory,
    }
  }

  /** Whether `other` is the same device (same backend and ordinal). */
  same(other: Device): boolean {
    return call(() => this._n.same(want(other, Device, 'other')._n))
  }

  /**
   * Waits (off the JS thread) for all queued work, then reports the first step that failed
   * and was not reported yet: an {@link MlaError} (e.g. `ERR_BLOCK_INDEX` for a
   * device-resident block index out of range) whose {@link MlaError.step} and
   * {@link MlaError.stepLabel} name the step; the other failed steps are named in its
   * message. See {@link decodeInto} for the step model.
   */
  synchronize(): Promise<void> {
    return callAsync(async () => {
      await call(() => this._n.synchronize())
    })
  }

  /** {@link synchronize} on the calling thread. */
  synchronizeSync(): void {
    call(() => this._n.synchronizeSync())
  }

  /**
   * Waits (off the JS thread) until step `step` (an id from {@link decodeInto},
   * {@link decode}, {@link KvCache.appendBatch}, ...) has completed, and rejects with that
   * step's own error when it failed. Failures of other steps are left for the next
   * {@link synchronize}.
   */
  waitStep(step: number): Promise<void> {
    return callAsync(async () => {
      int('step', step, 1, Number.MAX_SAFE_INTEGER)
      await call(() => this._n.waitStep(step))
    })
  }

  /** {@link waitStep} on the calling thread. */
  waitStepSync(step: number): void {
    int('step', step, 1, Number.MAX_SAFE_INTEGER)
    call(() => this._n.waitStepSync(step))
  }

  /** {@link captureStep} on this device. */
  captureStep(opts: CaptureOptions): CapturedStep {
    return captureStep(this, opts)
  }

  /**
   * Memory and step-log facts: host bytes of CPU-backend tensors (process-wide); on CUDA
   * the live device buffers of this library, the memory pool's reserved and used bytes,
   * free device memory, and enqueued steps not yet looked at. For soak tests and leaks.
   */
  memoryStats(): MemoryStats {
    return call(() => this._n.memoryStats())
  }

  /**
   * Creates a tensor on this device from host data.
   *
   * - `Float32Array`: values, rounded natively (nearest even) to `dtype` (`'bf16'`, `'fp16'`
   *   or `'fp32'`; default `'fp32'`).
   * - `Uint16Array`: raw bf16 / fp16 bit patterns; `dtype` is required.
   * - `Int32Array`: int32 values (`dtype` `'int32'`, the default).
   *
   * `data.length` must equal the product of `shape` (`ERR_SHAPE`).
   *
   * @example
   * ```ts
   * const q = dev.tensor(new Float32Array(2 * 1 * 16 * 576).fill(0.01), [2, 1, 16, 576], 'bf16')
   * const lens = dev.tensor(new Int32Array([100, 70]), [2])
   * ```
   */
  tensor(data: Float32Array, shape: number[], dtype?: 'bf16' | 'fp16' | 'fp32'): Tensor
  tensor(data: Uint16Array, shape: number[], dtype: HalfDType): Tensor
  tensor(data: Int32Array, shape: number[], dtype?: 'int32'): Tensor
  tensor(data: Float32Array | Uint16Array | Int32Array, shape: number[], dtype?: DType): Tensor {
    const s = checkShape(shape)
    if (dtype !== undefined && typeof dtype !== 'string') fail('ERR_DTYPE', `dtype: expected a string, got ${describe(dtype)}`)
    if (data instanceof Float32Array) {
      return Tensor._wrap(call(() => this._n.tensorFromF32(data, s, dtype ?? 'fp32')))
    }
    if (data instanceof Uint16Array) {
      if (dtype === undefined) fail('ERR_DTYPE', "dtype: expected 'bf16' or 'fp16' for raw 16-bit data, got none")
      return Tensor._wrap(call(() => this._n.tensorFromBits(data, s, dtype)))
    }
    if (data instanceof Int32Array) {
      if (dtype !== undefined && dtype !== 'int32') fail('ERR_DTYPE', `dtype: expected 'int32' for Int32Array data, got '${dtype}'`)
      return Tensor._wrap(call(() => this._n.tensorFromI32(data, s)))
    }
    return fail('ERR_INVALID_ARGUMENT', `data: expected a Float32Array, Uint16Array or Int32Array, got ${describe(data)}`)
  }

  /** A zero-filled tensor (all bits zero). */
  zeros(shape: number[], dtype: DType): Tensor {
    const s = checkShape(shape)
    return Tensor._wrap(call(() => this._n.zeros(s, dtype)))
  }

  /**
   * Split-KV scheduling metadata for one decode step (FlashMLA's `get_mla_metadata`):
   * depends only on the lengths, `sQ * hQ / hKv` and the device. Compute it once per step
   * and reuse it for every layer. `cacheSeqlens` is a `[b]` int32 tensor on this device.
   * On CUDA it is computed on the device from the device-resident lengths.
   *
   * A plan belongs to the lengths it was made from: call `device.plan` again whenever the
   * lengths change (in decoding, every step: each appended token changes them), even when
   * the same `cacheSeqlens` tensor is passed. Reusing a plan for other lengths is
   * `ERR_INVALID_ARGUMENT` on CUDA, found by the kernels and reported when the decode
   * settles (its outputs are not returned); the CPU backend recomputes the schedule from
   * the lengths it is given, so there a stale plan goes unnoticed. A plan for another batch
   * size or `sQ * hQ / hKv` is `ERR_INVALID_ARGUMENT` on both, before anything runs.
   *
   * @example
   * ```ts
   * // after appending each sequence's new token (the lengths changed):
   * const { blockTable, cacheSeqlens } = cache.batch(seqs)
   * const plan = dev.plan(cacheSeqlens, { hQ: 128 })           // a new plan for the new lengths
   * for (const q of perLayerQ) await decode({ q, kvCache: cache, blockTable, cacheSeqlens, plan })
   * plan.dispose()
   * ```
   *
   * With `batchInvariant: true` the plan's split points depend on each sequence's own
   * length only, so a sequence's `out` and `lse` are bit for bit the same whatever else is
   * in the batch (see {@link Plan.batchInvariant} for what is and is not guaranteed, and
   * the README's "Batch-invariant decoding" for the cost). {@link Plan.update} keeps it.
   *
   * @param opts.sQ query tokens per sequence (default 1)
   * @param opts.hQ query heads
   * @param opts.hKv KV heads (must be 1, the default)
   * @param opts.batchInvariant batch-invariant split points (default false: FlashMLA's schedule)
   */
  plan(cacheSeqlens: Tensor, opts: { sQ?: number; hQ: number; hKv?: number; batchInvariant?: boolean }): Plan {
    const t = want(cacheSeqlens, Tensor, 'cacheSeqlens')
    const { sQ = 1, hQ, hKv = 1, batchInvariant } = opts ?? ({} as { hQ: number; batchInvariant?: boolean })
    for (const [k, v] of [
      ['sQ', sQ],
      ['hQ', hQ],
      ['hKv', hKv],
    ] as const)
      int(k, v, 1, MAX_I32)
    if (sQ * hQ > MAX_I32) fail('ERR_INVALID_ARGUMENT', `sQ * hQ: expected at most ${MAX_I32}, got ${sQ} * ${hQ} = ${sQ * hQ}`)
    if (batchInvariant != null && typeof batchInvariant !== 'boolean')
      fail('ERR_INVALID_ARGUMENT', `batchInvariant: expected a boolean, got ${describe(batchInvariant)}`)
    return Plan._wrap(call(() => this._n.plan(t._n, sQ, hQ, hKv, batchInvariant ?? undefined)))
  }

  /** Releases this handle. Objects created from the device keep it alive. */
  override dispose(): void {
    super.dispose()
  }

  /** @internal */
  _inspect(): Record<string, unknown> {
    const i = this.info
    return this.kind === 'cuda'
      ? {
          kind: this.kind,
          ordinal: i.ordinal,
          name: i.name,
          computeCapability: i.computeCapability.join('.'),
          kernelPath: i.kernelPath,
          multiprocessors: i.multiprocessors,
        }
      : { kind: this.kind, name: i.name }
  }
}

/** How inspect names a device: `'cpu'` or `'cuda:<n>'`. */
export function deviceName(d: Device): string {
  return d.kind === 'cuda' ? `cuda:${d.info.ordinal}` : 'cpu'
}
