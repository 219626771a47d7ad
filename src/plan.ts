/** `Plan`: split-KV scheduling metadata (FlashMLA's `get_mla_metadata`). */

import type * as Native from '../binding'
import { int, MAX_I32, want } from './check'
import { call, fail } from './errors'
import { Handle } from './handle'
import { native } from './native'
import { Tensor } from './tensor'

/**
 * Split-KV scheduling metadata for one decode step (see {@link Device.plan} and
 * {@link getMlaMetadata}). Reuse it for every layer of the step, and make a new one when
 * the cache lengths change (a plan made for other lengths is `ERR_INVALID_ARGUMENT` on
 * CUDA; see {@link Device.plan}).
 *
 * {@link tileSchedulerMetadata} and {@link numSplits} are views of the plan's memory with
 * lifetimes of their own: each keeps the plan's memory alive (natively) until it is
 * disposed or garbage collected, and disposing the plan does not dispose them.
 */
export class Plan extends Handle {
  /** @internal */
  declare readonly _n: Native.Plan
  /** The native plan's id (0 until first used), see {@link _id}. */
  private _nid = 0

  private constructor(n: Native.Plan) {
    super(n)
  }

  /** @internal The native plan's id for the hot native calls (as {@link Tensor._id}). */
  _id(): number {
    return this._nid || (this._nid = call(() => native.planId(this._n)))
  }

  /** Number of parts the work is divided into (SM groups on CUDA, threads on the CPU). */
  get numParts(): number {
    return call(() => this._n.numParts)
  }
  /** Batch size the plan was made for. */
  get batch(): number {
    return call(() => this._n.batch)
  }
  /** Query rows per sequence and KV head (sQ * hQ / hKv) the plan was made for. */
  get rows(): number {
    return call(() => this._n.rows)
  }
  /**
   * Whether the plan is batch-invariant (`device.plan(..., { batchInvariant: true })`):
   * each sequence is cut into chunks that depend on its own length only (at most 8 chunks
   * of up to 64 blocks = 4096 tokens; longer sequences get 8 longer chunks), each chunk
   * its own split, merged in chunk order. Then a sequence's `out` and `lse` bits are a
   * function of its own queries, cache rows and length: the same beside any batchmates,
   * at any position in the batch, wherever its blocks sit in the pool.
   *
   * Guaranteed on one backend and device kind, with one build of the package, for one
   * dtype, `hQ`, `sQ`, `causal` and `softmaxScale`. Not guaranteed across the CPU and
   * CUDA backends, across decode kernels (`MLA_DECODE_KERNEL`), across CPUs whose inner
   * loops differ (AVX2 or not), across versions that change a kernel, with the
   * `MLA_INVARIANT_*` / `MLA_SPLIT_FIXED_COST` tuning variables changed, or between an
   * invariant and a default plan.
   */
  get batchInvariant(): boolean {
    return call(() => this._n.batchInvariant)
  }
  /**
   * `[numParts, 8]` int32: per part, begin_seq, begin_block, end_seq, end_block, the
   * split index of its first segment, then zeros.
   *
   * Each access returns a new handle viewing the plan's tensor (no copy). The handle keeps
   * the plan's memory alive: it stays usable after {@link dispose}, until it is disposed
   * itself (or garbage collected).
   */
  get tileSchedulerMetadata(): Tensor {
    return Tensor._wrap(call(() => this._n.tileSchedulerMetadata))
  }
  /**
   * `[b + 1]` int32: exclusive prefix sum of splits per sequence. Like
   * {@link tileSchedulerMetadata}, a new handle per access that outlives {@link dispose}.
   */
  get numSplits(): Tensor {
    return Tensor._wrap(call(() => this._n.numSplits))
  }
  /**
   * Re-plans in place for new lengths (`cacheSeqlens`, a `[batch]` int32 tensor on the
   * plan's device): the same memory, no allocation; equals a fresh {@link Device.plan} for
   * them with the same options (a batch-invariant plan stays one). On CUDA one plan kernel is enqueued (returns at once; a length out of range is
   * reported by the next synchronising call, naming this step); the CPU backend recomputes
   * now. Decodes enqueued earlier with this plan still use the old schedule (stream order).
   * Returns the step id.
   *
   * @example
   * ```ts
   * cache.batchInto(seqs, blockTable, cacheSeqlens)   // the lengths grew by one token
   * plan.update(cacheSeqlens)
   * ```
   */
  update(cacheSeqlens: Tensor): number {
    const sl = want(cacheSeqlens, Tensor, 'cacheSeqlens')._id()
    return call(() => native.planUpdate(this._id(), sl))
  }
  /**
   * Releases this handle. It does not dispose the {@link tileSchedulerMetadata} /
   * {@link numSplits} tensors handed out earlier (those of {@link getMlaMetadata}
   * included): they keep the plan's memory (and on CUDA its workspace) alive until they are
   * disposed as well, and a decode given them keeps working.
   */
  override dispose(): void {
    super.dispose()
  }

  /** @internal */
  _inspect(): Record<string, unknown> {
    return { batch: this.batch, rows: this.rows, numParts: this.numParts, batchInvariant: this.batchInvariant }
  }
}

// ---------------------------------------------------------------------------------------
// FlashMLA-shaped functional form

/**
 * FlashMLA's `get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)`.
 *
 * @param cacheSeqlens `[b]` int32 tensor.
 * @param numHeadsPerHeadK `s_q * h_q / h_kv`.
 * @param numHeadsK `h_kv` (must be 1).
 * @returns the two metadata tensors, and the {@link Plan} they belong to. The tensors keep
 * the plan's memory alive on their own: disposing `plan` does not dispose them. As with
 * {@link Device.plan}, call this again whenever the lengths change (a plan reused for other
 * lengths is `ERR_INVALID_ARGUMENT` on CUDA).
 */
export function getMlaMetadata(
  cacheSeqlens: Tensor,
  numHeadsPerHeadK: number,
  numHeadsK: number,
): { tileSchedulerMetadata: Tensor; numSplits: Tensor; plan: Plan } {
  const t = want(cacheSeqlens, Tensor, 'cacheSeqlens')
  for (const [k, v] of [
    ['numHeadsPerHeadK', numHeadsPerHeadK],
    ['numHeadsK', numHeadsK],
  ] as const)
    int(k, v, 1, MAX_I32)
  if (numHeadsPerHeadK * numHeadsK > MAX_I32) {
    fail(
      'ERR_INVALID_ARGUMENT',
      `numHeadsPerHeadK * numHeadsK: expected at most ${MAX_I32}, got ${numHeadsPerHeadK} * ${numHeadsK} = ${numHeadsPerHeadK * numHeadsK}`,
    )
  }
  // rows = sQ * hQ / hKv = numHeadsPerHeadK: pass sQ = 1, hQ = numHeadsPerHeadK * numHeadsK.
  const plan = t.device.plan(t, { sQ: 1, hQ: numHeadsPerHeadK * numHeadsK, hKv: numHeadsK })
  return { tileSchedulerMetadata: plan.tileSchedulerMetadata, numSplits: plan.numSplits, plan }
}
