/**
 * Checks of the arguments, before the native call, and how a rejected value is shown.
 *
 * The binding takes counts and ids as u32 / i64, and napi-rs converts a JS number to those
 * without complaint: 1.5 becomes 1, NaN becomes 0, -1 as a u32 becomes 4294967295. Every
 * integer argument is therefore checked here, before the native call.
 */

import { BLOCK_SIZE, BLOCK_TABLE_PAD } from './constants'
import { fail, type ErrorCode } from './errors'

/** Largest value of a count the kernels index with 32-bit ints (i32::MAX). */
export const MAX_I32 = 2 ** 31 - 1
/** Largest tensor extent the binding accepts (u32::MAX). */
export const MAX_EXTENT = 2 ** 32 - 1
/**
 * Largest pool (blocks): `mla_core::BLOCK_TABLE_PAD` (i32::MAX - 4095), the value batch()
 * pads block tables with, so that no real block index can equal it.
 */
export const MAX_CACHE_BLOCKS = BLOCK_TABLE_PAD
/** Largest block-table width: max_blocks_per_seq * 64 must stay below 2^31 (i32::MAX / 64). */
export const MAX_BLOCKS_PER_SEQ = Math.floor(MAX_I32 / BLOCK_SIZE)

/** How a rejected value is shown in a message. */
export function show(v: unknown): string {
  if (typeof v === 'number' || typeof v === 'bigint' || typeof v === 'boolean' || v === undefined) return String(v)
  if (typeof v === 'string') return JSON.stringify(v)
  return describe(v)
}

/** `v` when it is an integer within [min, max]; else throws `code` naming `name`. */
export function int(name: string, v: unknown, min: number, max: number, code: ErrorCode = 'ERR_INVALID_ARGUMENT'): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    fail(code, `${name}: expected an integer within [${min}, ${max}], got ${show(v)}`)
  }
  return v
}

/**
 * A sequence id: any safe integer. Negative ones pass through, and the cache reports them
 * as `ERR_UNKNOWN_SEQUENCE` (no cache ever returns one), like any other id it does not know.
 */
export function seqId(name: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v)) {
    fail('ERR_INVALID_ARGUMENT', `${name}: expected a sequence id (an integer returned by this cache), got ${show(v)}`)
  }
  return v
}

/** Scratch for {@link seqList}: reused by every call (the binding reads it during the call only). */
let seqScratch = new Float64Array(256)

/**
 * Checks a list of sequence ids (each as {@link seqId}) and packs them for the binding as a
 * typed array view: the binding then reads them in one go instead of one JS value at a time
 * (about 0.1 µs per id), and no argument name is formatted unless an id is bad. The view is
 * valid until the next call.
 */
export function seqList(seqs: unknown): Float64Array {
  if (!Array.isArray(seqs)) fail('ERR_INVALID_ARGUMENT', `seqs: expected an array of sequence ids, got ${describe(seqs)}`)
  const n = seqs.length
  if (seqScratch.length < n) seqScratch = new Float64Array(Math.max(n, 2 * seqScratch.length))
  const out = seqScratch
  for (let i = 0; i < n; i++) {
    const v: unknown = seqs[i]
    if (typeof v !== 'number' || !Number.isSafeInteger(v)) seqId(`seqs[${i}]`, v)
    out[i] = v as number
  }
  return out.subarray(0, n)
}

export function want<T>(x: unknown, ctor: { prototype: T; name: string }, what: string): T {
  if (!(x instanceof (ctor as unknown as Function))) fail('ERR_INVALID_ARGUMENT', `${what}: expected a ${ctor.name}, got ${describe(x)}`)
  return x as T
}

export function describe(x: unknown): string {
  if (x === null) return 'null'
  if (typeof x === 'object') return (x as object).constructor?.name ?? 'object'
  return typeof x
}

export function checkShape(shape: unknown): number[] {
  if (!Array.isArray(shape)) fail('ERR_SHAPE', `shape: expected an array of integers within [0, ${MAX_EXTENT}], got ${show(shape)}`)
  shape.forEach((d, i) => int(`shape[${i}]`, d, 0, MAX_EXTENT, 'ERR_SHAPE'))
  return shape as number[]
}
