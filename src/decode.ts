/**
 * `decode` (a promise), `decodeSync` and `decodeInto` (enqueue only), the completion of
 * awaited CUDA decodes, and FlashMLA's `flash_mla_with_kvcache`.
 */

import type * as Native from '../binding'
import { describe, show, want } from './check'
import { HEAD_DIM_V } from './constants'
import { call, callAsync, fail, toMlaError } from './errors'
import { KvCache } from './cache'
import { native } from './native'
import { Plan } from './plan'
import { Tensor } from './tensor'

/** Arguments of {@link decode}. */
export interface DecodeArgs {
  /** `[b, sQ, hQ, 576]` bf16 / fp16. */
  q: Tensor
  /** `[numBlocks, 64, 1, 576]`, q's dtype: a tensor, or a {@link KvCache} (its pool). */
  kvCache: Tensor | KvCache
  /** `[b, maxBlocksPerSeq]` int32. Entries past a sequence's blocks are never read. */
  blockTable: Tensor
  /** `[b]` int32, each within [0, maxBlocksPerSeq * 64]. */
  cacheSeqlens: Tensor
  /** Scheduling metadata from {@link Device.plan}; computed when omitted. */
  plan?: Plan
  /** For sQ > 1: query token j of a length-L sequence sees keys 0..=L-sQ+j. Default false. */
  causal?: boolean
  /** Default 1 / sqrt(576). */
  softmaxScale?: number
  /** The step's label in error messages (default `'decode'`), e.g. `'layer 3'`. */
  label?: string
  /**
   * Without `plan`: plan batch-invariantly (see {@link Plan.batchInvariant}). With a plan,
   * `true` requires a batch-invariant one (`ERR_INVALID_ARGUMENT` otherwise). Default false.
   */
  batchInvariant?: boolean
}

/** Outputs of one decode step. */
export interface DecodeResult {
  /** `[b, sQ, hQ, 512]`, q's dtype. Rows that attend to no key are 0. */
  out: Tensor
  /** `[b, hQ, sQ]` fp32, natural log of the softmax denominator; +Infinity for rows that attend to no key. */
  lse: Tensor
  /** The id of the step that computed them (see {@link decodeInto}). */
  step: number
}

/** The binding's arguments: the tensors and the plan as their ids (see {@link Tensor._id}), checked here. */
function nativeArgs(a: DecodeArgs) {
  if (a == null || typeof a !== 'object') fail('ERR_INVALID_ARGUMENT', `decode: expected an arguments object, got ${describe(a)}`)
  const q = want(a.q, Tensor, 'q')._id()
  const kv = a.kvCache instanceof KvCache ? a.kvCache._poolId() : want(a.kvCache, Tensor, 'kvCache')._id()
  const bt = want(a.blockTable, Tensor, 'blockTable')._id()
  const sl = want(a.cacheSeqlens, Tensor, 'cacheSeqlens')._id()
  const plan = a.plan == null ? undefined : want(a.plan, Plan, 'plan')._id()
  if (a.causal != null && typeof a.causal !== 'boolean')
    fail('ERR_INVALID_ARGUMENT', `causal: expected a boolean, got ${describe(a.causal)}`)
  if (a.softmaxScale != null && typeof a.softmaxScale !== 'number')
    fail('ERR_INVALID_ARGUMENT', `softmaxScale: expected a number, got ${describe(a.softmaxScale)}`)
  if (a.label != null && typeof a.label !== 'string') fail('ERR_INVALID_ARGUMENT', `label: expected a string, got ${describe(a.label)}`)
  if (a.batchInvariant != null && typeof a.batchInvariant !== 'boolean')
    fail('ERR_INVALID_ARGUMENT', `batchInvariant: expected a boolean, got ${describe(a.batchInvariant)}`)
  return [
    q,
    kv,
    bt,
    sl,
    plan,
    a.causal ?? undefined,
    a.softmaxScale ?? undefined,
    a.label ?? undefined,
    a.batchInvariant ?? undefined,
  ] as const
}

// ---------------------------------------------------------------------------------------
// Completion of awaited CUDA decodes

/**
 * How long (µs) an awaited CUDA decode is polled for from the event loop before its wait
 * moves to the libuv thread pool: `MLA_AWAIT_SPIN_US`, default 2000; 0 waits on the pool
 * at once (the previous behaviour).
 */
export const AWAIT_SPIN_US = (() => {
  const v = Number(process.env.MLA_AWAIT_SPIN_US ?? '2000')
  return Number.isFinite(v) && v >= 0 ? v : 2000
})()
let awaitSpinUs = AWAIT_SPIN_US

/** @internal The bench's breakdown compares both completion paths in one process. */
export function _setAwaitSpinUs(us: number | undefined): void {
  awaitSpinUs = us ?? AWAIT_SPIN_US
}

interface StepWaiter {
  poll: () => boolean
  fallback: () => Promise<void>
  until: number
  resolve: () => void
  reject: (e: unknown) => void
}
const waiters: StepWaiter[] = []
let polling = false

/**
 * Resolves once `poll()` says the step has completed (it throws the step's error when the
 * step failed). Polled from the event loop — one `setImmediate` turn per round, one poll
 * per pending step — so the JS thread stays free and no thread has to be woken when the
 * step ends, for up to `spinUs` µs; past that the wait moves to `fallback()` (the libuv
 * pool), so that long steps do not keep a core busy.
 */
export function whenDone(poll: () => boolean, fallback: () => Promise<void>, spinUs: number): Promise<void> {
  if (spinUs <= 0) return fallback()
  return new Promise<void>((resolve, reject) => {
    waiters.push({ poll, fallback, until: performance.now() + spinUs / 1000, resolve, reject })
    if (!polling) {
      polling = true
      setImmediate(pollSteps)
    }
  })
}

function pollSteps(): void {
  const now = performance.now()
  let kept = 0
  for (let i = 0; i < waiters.length; i++) {
    const w = waiters[i]!
    let done: boolean
    try {
      done = w.poll()
    } catch (e) {
      w.reject(toMlaError(e))
      continue
    }
    if (done) w.resolve()
    else if (now > w.until) w.fallback().then(w.resolve, w.reject)
    else waiters[kept++] = w
  }
  waiters.length = kept
  if (kept > 0) setImmediate(pollSteps)
  else polling = false
}

/** The completion of a CUDA decode's tracked step (`out` is one of its outputs). */
function stepDone(out: Native.Tensor, step: number): Promise<void> {
  return whenDone(
    () => native.pollStep(out, step),
    () => callAsync(async () => void (await call(() => out.device.waitStep(step)))),
    awaitSpinUs,
  )
}

/** @internal The poller with stand-in polls, for tests. */
export const _whenDone = whenDone

/**
 * One MLA decode step: attention of `q` over each sequence's cached latent rows, resolving
 * once the results are complete. On CUDA the step is enqueued on the calling thread and
 * its completion is polled from the event loop (an event query per turn of the loop, for
 * up to `MLA_AWAIT_SPIN_US` µs, default 2000), then waited for on the libuv thread pool;
 * on the CPU backend the computation runs on the pool. The JS thread stays free either
 * way. Allocates the outputs; a serving loop uses {@link decodeInto} instead.
 *
 * Errors: the JS types, the integer arguments, and every shape, dtype and device rule
 * (including a plan made for another batch size or `sQ * hQ / hKv`) are checked before
 * anything runs; a violation rejects with the code of the rule and launches nothing. The
 * values inside `blockTable` and `cacheSeqlens` are checked where they live:
 *
 * - on the CPU backend, before anything runs (`ERR_BLOCK_INDEX`, `ERR_SEQLEN_RANGE`);
 * - on CUDA (device-resident tables), by the kernels, after the launch: a block index that
 *   would be read outside `[0, numBlocks)` (`ERR_BLOCK_INDEX`), a length outside
 *   `[0, maxBlocksPerSeq * 64]` (`ERR_SEQLEN_RANGE`), or a `plan` made for other lengths
 *   (`ERR_INVALID_ARGUMENT`, see {@link Device.plan}) reject when the promise settles. The
 *   kernels skip what they cannot read, and that step's outputs are discarded, not
 *   returned; the error reaches this decode only (every step has its own error flag; see
 *   {@link decodeInto}), with {@link MlaError.step} set to this step's id.
 *
 * Memory that cannot be allocated (host or device) rejects with `ERR_OUT_OF_MEMORY`.
 *
 * @example
 * ```ts
 * const { out, lse } = await decode({ q, kvCache: cache, blockTable, cacheSeqlens, causal: true })
 * const o = await out.toFloat32Array()         // [b, sQ, hQ, 512]
 * ```
 */
export function decode(args: DecodeArgs): Promise<DecodeResult> {
  return callAsync(async () => {
    const a = nativeArgs(args)
    const e = call(() => native.decodeEnqueue(...a))
    if (e == null) {
      // The CPU backend: the computation itself runs on the libuv pool.
      const r = (await call(() => native.decode(...a))) as Native.DecodeResult
      return { out: Tensor._wrap(r.out), lse: Tensor._wrap(r.lse), step: r.step }
    }
    const r: DecodeResult = { out: Tensor._wrap(e.out), lse: Tensor._wrap(e.lse), step: e.step }
    try {
      await stepDone(e.out, e.step)
    } catch (err) {
      // A failed step's outputs are not valid: not returned, freed now.
      r.out.dispose()
      r.lse.dispose()
      throw err
    }
    return r
  })
}

/**
 * {@link decode} on the calling thread (for scripts; blocks the event loop). It throws what
 * {@link decode} rejects with; on CUDA it waits for the device, so the device-side checks
 * are reported by this call too.
 */
export function decodeSync(args: DecodeArgs): DecodeResult {
  const r = call(() => native.decodeSync(...nativeArgs(args)))
  return { out: Tensor._wrap(r.out), lse: Tensor._wrap(r.lse), step: r.step }
}

// ---------------------------------------------------------------------------------------
// The serving path: enqueue without waiting, caller-owned outputs

/** Caller-owned outputs of {@link decodeInto}. */
export interface DecodeOutputs {
  /** `[b, sQ, hQ, 512]`, q's dtype, a tensor of its own (`storage === 'owned'`). */
  out: Tensor
  /** `[b, hQ, sQ]` fp32, a tensor of its own. */
  lse: Tensor
}

/**
 * Enqueues one decode step into caller-owned `out` / `lse` and returns its step id as soon
 * as the work is queued: no allocation, no wait for the device. This is the serving path:
 * re-plan in place ({@link Plan.update}), enqueue every layer, then synchronise once.
 *
 * The step model: every call that launches work is a step with an id (1, 2, 3, ... per
 * device) and a label (`args.label`, default `'decode'`). Shapes, dtypes, devices and the
 * plan's sizes are checked now and throw (nothing is queued). The contents of the tensors
 * (a block index that would be read outside the pool, a length out of range, on CUDA a
 * plan made for other lengths) are checked where they live and reported by the next
 * synchronising call — {@link Device.synchronize}, {@link Device.waitStep} for this step,
 * or reading any tensor of the device to the host — as an {@link MlaError} whose
 * {@link MlaError.step} / {@link MlaError.stepLabel} name the failing step. Each step has
 * its own error flag, so a bad step never fails or corrupts a later one; its own outputs
 * are not valid. The CPU backend computes during the call (on the calling thread) and keeps
 * the same model: content errors are recorded for the step (its outputs are filled with
 * NaN) and reported the same way.
 *
 * `out` and `lse` must be tensors of their own, distinct from the inputs, that no pending
 * operation (a read) is using. Without `plan`, one is made for the call (an allocation).
 *
 * @example
 * ```ts
 * const plan = dev.plan(cacheSeqlens, { hQ: 16 })
 * const out = dev.zeros([b, 1, 16, 512], 'bf16')
 * const lse = dev.zeros([b, 16, 1], 'fp32')
 * for (let step = 0; step < 100; step++) {
 *   cache.appendBatch(seqs, newRows)                  // one call, one copy
 *   cache.batchInto(seqs, blockTable, cacheSeqlens)   // lengths in place
 *   plan.update(cacheSeqlens)                         // re-plan in place
 *   for (const [l, q] of qs.entries()) decodeInto({ q, kvCache: cache, blockTable, cacheSeqlens, plan, label: `layer ${l}` }, { out, lse })
 *   await dev.synchronize()                           // a bad step is reported here, by id
 * }
 * ```
 */
export function decodeInto(args: DecodeArgs, outputs: DecodeOutputs): number {
  const a = nativeArgs(args)
  if (outputs == null || typeof outputs !== 'object')
    fail('ERR_INVALID_ARGUMENT', `outputs: expected { out, lse }, got ${describe(outputs)}`)
  const out = want(outputs.out, Tensor, 'out')._id()
  const lse = want(outputs.lse, Tensor, 'lse')._id()
  // Natively the outputs are written through exclusive references: no aliasing allowed
  // (one id per native tensor, so equal ids are the same tensor).
  if (out === lse) fail('ERR_INVALID_ARGUMENT', 'out, lse: expected two distinct tensors, got the same one twice')
  if (out === a[0] || out === a[1] || out === a[2] || out === a[3])
    fail('ERR_INVALID_ARGUMENT', 'out: expected a tensor distinct from the inputs, got one of them')
  if (lse === a[0] || lse === a[1] || lse === a[2] || lse === a[3])
    fail('ERR_INVALID_ARGUMENT', 'lse: expected a tensor distinct from the inputs, got one of them')
  return call(() => native.decodeInto(...a, out, lse))
}

/**
 * FlashMLA's `flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
 * tile_scheduler_metadata, num_splits, softmax_scale=None, causal=False)`, resolving to
 * `[out, lse]`.
 *
 * `tileSchedulerMetadata` / `numSplits` must come from {@link getMlaMetadata} (or pass the
 * {@link Plan} itself, or `null` for both to plan here). `headDimV` must be 512.
 *
 * @example
 * ```ts
 * const { tileSchedulerMetadata, numSplits } = getMlaMetadata(cacheSeqlens, sQ * hQ, 1)
 * const [out, lse] = await flashMlaWithKvcache(q, kCache, blockTable, cacheSeqlens, 512,
 *                                              tileSchedulerMetadata, numSplits, undefined, true)
 * ```
 */
export async function flashMlaWithKvcache(
  q: Tensor,
  kCache: Tensor | KvCache,
  blockTable: Tensor,
  cacheSeqlens: Tensor,
  headDimV: number,
  tileSchedulerMetadata: Tensor | Plan | null | undefined,
  numSplits: Tensor | null | undefined,
  softmaxScale?: number | null,
  causal?: boolean,
): Promise<[Tensor, Tensor]> {
  if (headDimV !== HEAD_DIM_V) fail('ERR_INVALID_ARGUMENT', `head_dim_v: expected ${HEAD_DIM_V}, got ${show(headDimV)}`)
  const plan = planOf(tileSchedulerMetadata, numSplits)
  const r = await decode({
    q,
    kvCache: kCache,
    blockTable,
    cacheSeqlens,
    ...(plan ? { plan } : {}),
    ...(causal != null ? { causal } : {}),
    ...(softmaxScale != null ? { softmaxScale } : {}),
  })
  return [r.out, r.lse]
}

function planOf(meta: Tensor | Plan | null | undefined, numSplits: Tensor | null | undefined): Plan | undefined {
  if (meta == null) {
    if (numSplits != null)
      fail('ERR_INVALID_ARGUMENT', 'tile_scheduler_metadata: expected the tensor from getMlaMetadata along with num_splits, got none')
    return undefined
  }
  if (meta instanceof Plan) return meta
  const m = want(meta, Tensor, 'tile_scheduler_metadata')
  const p = m._sourcePlan()
  if (!p) fail('ERR_INVALID_ARGUMENT', 'tile_scheduler_metadata: expected the tensor returned by getMlaMetadata, got another tensor')
  if (numSplits != null) {
    const s = want(numSplits, Tensor, 'num_splits')
    if (!s.sameStorage(p.numSplits))
      fail(
        'ERR_INVALID_ARGUMENT',
        'num_splits: expected the tensor returned by getMlaMetadata with tile_scheduler_metadata, got another tensor',
      )
  }
  return p
}
