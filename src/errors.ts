/** Errors: the stable codes, {@link MlaError}, and the conversion of the binding's errors. */

/**
 * Stable error codes. Every error thrown by this package is an {@link MlaError} whose
 * `code` is one of these.
 *
 * | code | meaning |
 * | --- | --- |
 * | `ERR_SHAPE` | a tensor has the wrong rank or extent |
 * | `ERR_DTYPE` | a tensor has the wrong element type (or an unknown dtype name) |
 * | `ERR_INVALID_ARGUMENT` | a wrong value: d != 576, block size != 64, h_kv != 1, headDimV != 512, softmaxScale <= 0, a bad device spec, a count or id that is not an integer in range (1.5, NaN, -1, 2^40), a plan made for another batch or head count; on CUDA also a plan made for other cache lengths (found on the device, reported when the decode settles) |
 * | `ERR_SEQLEN_RANGE` | a cache length outside [0, maxBlocksPerSeq * 64] |
 * | `ERR_BLOCK_INDEX` | a block index that would be read is outside [0, numBlocks) (checked on the device for device-resident tables) |
 * | `ERR_CACHE_EXHAUSTED` | the paged cache has no free block left |
 * | `ERR_UNKNOWN_SEQUENCE` | a sequence id the cache does not know (freed or never created) |
 * | `ERR_GPU_UNAVAILABLE` | no usable CUDA GPU (no driver, no device, compute capability below 8.0) |
 * | `ERR_KERNELS_UNAVAILABLE` | this build carries no GPU kernels (no CUDA compiler at build time), or none for this device or the kernel path asked for |
 * | `ERR_DRIVER_TOO_OLD` | the NVIDIA driver is older than the kernels need (a driver for CUDA 12.0, R525.60.13, or newer; CUDA 12.9 where the compute_80 PTX is JIT-compiled); the message names the driver's CUDA version and the one needed |
 * | `ERR_CUDA` | a CUDA driver call failed |
 * | `ERR_DISPOSED` | the object was disposed |
 * | `ERR_DEVICE_MISMATCH` | tensors live on different devices |
 * | `ERR_UNSUPPORTED` | a valid request this version does not implement |
 * | `ERR_OUT_OF_MEMORY` | host or device memory could not be allocated (a host allocation failed, or CUDA ran out of memory); the request may succeed with smaller sizes or once memory is freed |
 * | `ERR_INTERNAL` | a bug: a panic caught in native code |
 */
export type ErrorCode =
  | 'ERR_SHAPE'
  | 'ERR_DTYPE'
  | 'ERR_INVALID_ARGUMENT'
  | 'ERR_SEQLEN_RANGE'
  | 'ERR_BLOCK_INDEX'
  | 'ERR_CACHE_EXHAUSTED'
  | 'ERR_UNKNOWN_SEQUENCE'
  | 'ERR_GPU_UNAVAILABLE'
  | 'ERR_KERNELS_UNAVAILABLE'
  | 'ERR_DRIVER_TOO_OLD'
  | 'ERR_CUDA'
  | 'ERR_DISPOSED'
  | 'ERR_DEVICE_MISMATCH'
  | 'ERR_UNSUPPORTED'
  | 'ERR_OUT_OF_MEMORY'
  | 'ERR_INTERNAL'

/** Every {@link ErrorCode}, for iteration and checks. */
export const ERROR_CODES: readonly ErrorCode[] = Object.freeze([
  'ERR_SHAPE',
  'ERR_DTYPE',
  'ERR_INVALID_ARGUMENT',
  'ERR_SEQLEN_RANGE',
  'ERR_BLOCK_INDEX',
  'ERR_CACHE_EXHAUSTED',
  'ERR_UNKNOWN_SEQUENCE',
  'ERR_GPU_UNAVAILABLE',
  'ERR_KERNELS_UNAVAILABLE',
  'ERR_DRIVER_TOO_OLD',
  'ERR_CUDA',
  'ERR_DISPOSED',
  'ERR_DEVICE_MISMATCH',
  'ERR_UNSUPPORTED',
  'ERR_OUT_OF_MEMORY',
  'ERR_INTERNAL',
] as const)

/**
 * The error type of this package. `message` names the argument, the expected and the
 * actual value (as the Rust core wrote it); `code` is stable and meant for programs.
 *
 * @example
 * ```ts
 * try { Device.open('cuda') } catch (e) {
 *   if (e instanceof MlaError && e.code === 'ERR_GPU_UNAVAILABLE') console.log('no GPU:', e.message)
 * }
 * ```
 */
export class MlaError extends Error {
  /** The stable error code. */
  readonly code: ErrorCode
  /**
   * For an error found on the device (or, on the CPU backend, in an enqueued step) and
   * reported by a later synchronising call: the id of the step that caused it (see
   * {@link decodeInto}); 0 for work outside any step. Undefined otherwise.
   */
  readonly step?: number
  /** The label of that step (`'decode'`, `'plan'`, `'appendBatch'`, a label you gave). */
  readonly stepLabel?: string
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'MlaError'
    this.code = code
    // The core names the step as "step <id> (<label>): ..." at the start of the message.
    const m = /^step (\d+) \((.*?)\): /.exec(message)
    if (m) {
      this.step = Number(m[1])
      this.stepLabel = m[2]
    }
  }
}

function isCode(c: unknown): c is ErrorCode {
  return typeof c === 'string' && (ERROR_CODES as readonly string[]).includes(c)
}

/** A binding error (JS Error with a string code) as an MlaError, keeping message and code. */
export function toMlaError(e: unknown): unknown {
  if (e instanceof MlaError) return e
  if (e instanceof Error) {
    const code = (e as { code?: unknown }).code
    if (isCode(code)) return new MlaError(code, e.message, { cause: e })
    // napi-rs's own argument conversion errors (InvalidArg, NumberExpected, ...): a value
    // of the wrong JS type was passed.
    if (typeof code === 'string') return new MlaError('ERR_INVALID_ARGUMENT', `${e.message} (${code})`, { cause: e })
    if (e instanceof TypeError) return new MlaError('ERR_INVALID_ARGUMENT', e.message, { cause: e })
  }
  return e
}

export function call<T>(f: () => T): T {
  try {
    return f()
  } catch (e) {
    throw toMlaError(e)
  }
}

export async function callAsync<T>(f: () => Promise<T>): Promise<T> {
  try {
    return await f()
  } catch (e) {
    throw toMlaError(e)
  }
}

export function fail(code: ErrorCode, message: string): never {
  throw new MlaError(code, message)
}
