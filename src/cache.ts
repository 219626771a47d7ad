/** `KvCache`: the paged latent KV cache. */

import type * as Native from '../binding'
import { describe, int, MAX_BLOCKS_PER_SEQ, MAX_CACHE_BLOCKS, seqId, seqList, want } from './check'
import { call, fail } from './errors'
import { Device, deviceName, type HalfDType } from './device'
import { Handle } from './handle'
import { native } from './native'
import { Tensor } from './tensor'

/** Options of {@link KvCache}. */
export interface KvCacheOptions {
  /** Blocks in the pool (64 tokens each): an integer within [1, 2147479552]. */
  numBlocks: number
  /** Element type of the pool (default `'bf16'`; the aliases of {@link DType} work too). */
  dtype?: HalfDType
}

/**
 * A paged latent KV cache: a fixed pool of 64-token blocks (`[numBlocks, 64, 1, 576]`) and
 * sequences that grow by appending latent rows, with prefix sharing (copy-on-write) by
 * {@link fork}. {@link tensor} is the pool itself, usable as `kvCache` in {@link decode}
 * without copying; {@link batch} builds the block table and lengths for a set of sequences.
 *
 * A decode that reads the pool holds the cache's lock while it runs; cache calls made
 * meanwhile wait for it.
 *
 * @example
 * ```ts
 * using cache = new KvCache(dev, { numBlocks: 16, dtype: 'bf16' })
 * const s = cache.createSequence()
 * cache.append(s, new Float32Array(100 * 576).fill(0.01))   // 100 tokens
 * const { blockTable, cacheSeqlens } = cache.batch([s])
 * ```
 */
export class KvCache extends Handle {
  /** @internal */
  declare readonly _n: Native.KvCache
  /** The pool view that decode calls pass (made once, disposed with the cache), and its id. */
  private _pool: Native.Tensor | undefined
  private _poolNid = 0

  constructor(device: Device, opts: KvCacheOptions) {
    const d = want(device, Device, 'device')
    const { numBlocks, dtype = 'bf16' } = opts ?? ({} as KvCacheOptions)
    int('numBlocks', numBlocks, 1, MAX_CACHE_BLOCKS)
    super(call(() => new native.KvCache(d._n, numBlocks, dtype)))
  }

  /** A new, empty sequence; returns its id. */
  createSequence(): number {
    return call(() => this._n.createSequence())
  }

  /**
   * Appends latent rows (576 values per token) to `seq`: a `Float32Array` is rounded to
   * the cache's dtype, a `Uint16Array` holds raw bits of that dtype. Its length must be a
   * multiple of 576. All or nothing: on `ERR_CACHE_EXHAUSTED` the sequence is unchanged.
   */
  append(seq: number, rows: Float32Array | Uint16Array): void {
    seqId('seq', seq)
    if (rows instanceof Float32Array) return call(() => this._n.appendF32(seq, rows))
    if (rows instanceof Uint16Array) return call(() => this._n.appendBits(seq, rows))
    fail('ERR_INVALID_ARGUMENT', `rows: expected a Float32Array or Uint16Array, got ${describe(rows)}`)
  }

  /**
   * Appends the same number of latent rows to each of several distinct sequences in one
   * call: `rows` holds `seqs.length * n * 576` values, the `n` rows of `seqs[0]` first (a
   * `Float32Array` is rounded to the cache's dtype, a `Uint16Array` holds raw bits), or is a
   * tensor `[seqs.length, ..., 576]` of the cache's dtype on its device — e.g. the model's
   * own output, copied device to device with no host round trip. All or nothing: on
   * `ERR_CACHE_EXHAUSTED` (or any error) no sequence changed. Equals one {@link append}
   * per sequence (copy-on-write of shared blocks included).
   *
   * On CUDA it is one host-to-device copy (the rows and their destinations, staged in
   * pinned memory) and one scatter kernel, queued without waiting; decodes enqueued before
   * it still see the old lengths. Returns the step id.
   *
   * @example
   * ```ts
   * // one new token for every running sequence, from the model's [b, 1, 576] output
   * cache.appendBatch(seqs, kvOut)
   * cache.batchInto(seqs, blockTable, cacheSeqlens)
   * ```
   */
  appendBatch(seqs: number[], rows: Float32Array | Uint16Array | Tensor): number {
    const ids = seqList(seqs)
    if (rows instanceof Float32Array) return call(() => this._n.appendBatchF32(ids, rows))
    if (rows instanceof Uint16Array) return call(() => this._n.appendBatchBits(ids, rows))
    if (rows instanceof Tensor) return call(() => this._n.appendBatchTensor(ids, rows._n))
    return fail('ERR_INVALID_ARGUMENT', `rows: expected a Float32Array, Uint16Array or Tensor, got ${describe(rows)}`)
  }

  /**
   * {@link batch} into existing tensors, in place (no allocation): `blockTable`
   * `[seqs.length, W]` int32 (W at least the most blocks a given sequence holds) and
   * `cacheSeqlens` `[seqs.length]` int32 on the cache's device, tensors of their own. On
   * CUDA the two copies are queued and this returns at once; work enqueued earlier still
   * reads the old values.
   */
  batchInto(seqs: number[], blockTable: Tensor, cacheSeqlens: Tensor): void {
    const ids = seqList(seqs)
    const bt = want(blockTable, Tensor, 'blockTable')
    const sl = want(cacheSeqlens, Tensor, 'cacheSeqlens')
    if (bt._n === sl._n) fail('ERR_INVALID_ARGUMENT', 'blockTable, cacheSeqlens: expected two distinct tensors, got the same one twice')
    call(() => this._n.batchInto(ids, bt._n, sl._n))
  }

  /** A new sequence sharing `seq`'s tokens (copy-on-write); returns its id. */
  fork(seq: number): number {
    seqId('seq', seq)
    return call(() => this._n.fork(seq))
  }

  /** Frees `seq`; its blocks return to the pool once no other sequence shares them. */
  free(seq: number): void {
    seqId('seq', seq)
    call(() => this._n.free(seq))
  }

  /** Tokens in `seq`. */
  seqLen(seq: number): number {
    seqId('seq', seq)
    return call(() => this._n.seqLen(seq))
  }

  /** The pool blocks holding `seq`'s tokens, in order. */
  blockIds(seq: number): number[] {
    seqId('seq', seq)
    return call(() => this._n.blockIds(seq))
  }

  /** Ids of the live sequences. */
  sequences(): number[] {
    return call(() => this._n.sequences())
  }

  /** Blocks not used by any sequence. */
  get freeBlocks(): number {
    return call(() => this._n.freeBlocks)
  }
  /** Blocks in the pool. */
  get numBlocks(): number {
    return call(() => this._n.numBlocks)
  }
  /** Element type of the pool. */
  get dtype(): HalfDType {
    return call(() => this._n.dtype) as HalfDType
  }
  /** The device that holds the pool. */
  get device(): Device {
    return Device._wrap(call(() => this._n.device))
  }

  /**
   * Block table `[b, maxBlocksPerSeq]` and lengths `[b]` (int32, on the cache's device) for
   * `seqs`. `maxBlocksPerSeq` defaults to the longest sequence's block count; entries past
   * a sequence's blocks are unspecified.
   */
  batch(seqs: number[], maxBlocksPerSeq?: number): { blockTable: Tensor; cacheSeqlens: Tensor } {
    const ids = seqList(seqs)
    if (maxBlocksPerSeq !== undefined) int('maxBlocksPerSeq', maxBlocksPerSeq, 1, MAX_BLOCKS_PER_SEQ)
    const r = call(() => this._n.batch(ids, maxBlocksPerSeq))
    return { blockTable: Tensor._wrap(r.blockTable), cacheSeqlens: Tensor._wrap(r.cacheSeqlens) }
  }

  /** The pool `[numBlocks, 64, 1, 576]` as a tensor view (no copy), usable as `kvCache`. */
  get tensor(): Tensor {
    return Tensor._wrap(call(() => this._n.tensor))
  }

  /**
   * @internal The id of the pool as a native view (see {@link Tensor._id}), for decode
   * arguments: one view per cache, not one per call (making a view object costs about a
   * microsecond). Throws `ERR_DISPOSED` once the cache is disposed, as {@link tensor} does:
   * {@link dispose} drops the view.
   */
  _poolId(): number {
    if (this._pool === undefined) {
      const pool = call(() => this._n.tensor)
      this._poolNid = call(() => native.tensorId(pool))
      this._pool = pool
    }
    return this._poolNid
  }

  /** Releases this handle (views of the pool and pending decodes keep the pool alive). */
  override dispose(): void {
    // The decodes hold no native reference to the view (they take its id), so it can go now.
    this._pool?.dispose()
    this._pool = undefined
    this._poolNid = 0
    super.dispose()
  }

  /** @internal */
  _inspect(): Record<string, unknown> {
    return {
      numBlocks: this.numBlocks,
      freeBlocks: this.freeBlocks,
      dtype: this.dtype,
      sequences: this.sequences().length,
      device: deviceName(this.device),
    }
  }
}
