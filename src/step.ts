/** `CapturedStep`: a whole decode step of L layers captured once (a CUDA graph) and replayed. */

import type * as Native from '../binding'
import { describe, int, MAX_BLOCKS_PER_SEQ, MAX_EXTENT, MAX_I32, seqList, show, want } from './check'
import { call, fail } from './errors'
import { KvCache } from './cache'
import { Device, type HalfDType } from './device'
import { Handle } from './handle'
import { native } from './native'
import { Tensor } from './tensor'

/** Options of {@link captureStep}. */
export interface CaptureOptions {
  /** One pool per layer: a {@link KvCache} (its pool) or a `[numBlocks, 64, 1, 576]` tensor of its own. */
  kvCaches: (KvCache | Tensor)[]
  /** Sequences per step. */
  batch: number
  /** Width of the step's block table (blocks per sequence at most); lengths may grow up to 64 times it. */
  maxBlocksPerSeq: number
  /** Query tokens per sequence (default 1). */
  sQ?: number
  /** Query heads. */
  hQ: number
  /** Element type of q and the pools (default: the first pool's). */
  dtype?: HalfDType
  causal?: boolean
  softmaxScale?: number
  /** The replays' label in error messages (default `'graph step'`). */
  label?: string
  /** The step's plan batch-invariant (see {@link Plan.batchInvariant}); every replay re-plans with it. Default false. */
  batchInvariant?: boolean
}

/**
 * A whole decode step of L layers — the plan, then per layer the decode and its combine —
 * captured once (a CUDA graph on CUDA) and replayed with new contents in the step's own
 * tensors: its queries ({@link q}), block table and lengths ({@link setBatch}), read by every
 * replay at fixed device addresses; its outputs ({@link out}, {@link lse}) written by every
 * replay. The graph re-plans from the lengths on the device, so a replay needs no host
 * synchronisation: one graph launch. Each replay is a step (see {@link decodeInto}): a bad
 * block index or length is reported by the next synchronising call, naming the replay.
 *
 * The pools are the ones given at capture (their addresses are baked into the graph); the
 * step holds them alive. On the CPU backend a replay runs the same calls eagerly, with the
 * same semantics.
 *
 * @example
 * ```ts
 * using step = captureStep(dev, { kvCaches: layerCaches, batch: seqs.length, maxBlocksPerSeq: 64, hQ: 128 })
 * for (let token = 0; token < 100; token++) {
 *   for (const [l, c] of layerCaches.entries()) c.appendBatch(seqs, kvRows[l])   // one call each
 *   step.setBatch(layerCaches[0], seqs)          // lengths and block table, in place
 *   for (let l = 0; l < step.layers; l++) step.q(l).copyFrom(queries[l])       // device to device
 *   step.replay()                                 // one graph launch
 *   await dev.synchronize()                       // errors of the replay, by step id
 *   const o = await step.out(0).toFloat32Array()
 * }
 * ```
 */
export class CapturedStep extends Handle {
  /** @internal */
  declare readonly _n: Native.CapturedStep

  private constructor(n: Native.CapturedStep) {
    super(n)
  }

  /** Layers (decodes) per replay. */
  get layers(): number {
    return call(() => this._n.layers)
  }
  /** Whether replays launch a CUDA graph (false on the CPU backend: eager replays). */
  get isGraph(): boolean {
    return call(() => this._n.isGraph)
  }
  /** Layer `l`'s queries `[batch, sQ, hQ, 576]` (a view: write it with {@link Tensor.write} or {@link Tensor.copyFrom} before a replay). */
  q(l: number): Tensor {
    int('layer', l, 0, MAX_I32)
    return Tensor._wrap(call(() => this._n.q(l)))
  }
  /** Layer `l`'s outputs `[batch, sQ, hQ, 512]` of the last replay (a view). */
  out(l: number): Tensor {
    int('layer', l, 0, MAX_I32)
    return Tensor._wrap(call(() => this._n.out(l)))
  }
  /** Layer `l`'s lse `[batch, hQ, sQ]` of the last replay (a view). */
  lse(l: number): Tensor {
    int('layer', l, 0, MAX_I32)
    return Tensor._wrap(call(() => this._n.lse(l)))
  }
  /** The step's block table `[batch, maxBlocksPerSeq]` int32 (a view). */
  get blockTable(): Tensor {
    return Tensor._wrap(call(() => this._n.blockTable))
  }
  /** The step's lengths `[batch]` int32 (a view). */
  get cacheSeqlens(): Tensor {
    return Tensor._wrap(call(() => this._n.cacheSeqlens))
  }
  /** Writes the block table and lengths of `seqs` of `cache` into the step's tensors, in place ({@link KvCache.batchInto}). */
  setBatch(cache: KvCache, seqs: number[]): void {
    const c = want(cache, KvCache, 'cache')
    const ids = seqList(seqs)
    call(() => this._n.setBatch(c._n, ids))
  }
  /** Replays the step with the current contents of its tensors; returns the step id once it is queued. */
  replay(): number {
    return call(() => this._n.replay())
  }
  /** Releases this handle (views of the step's tensors keep it alive until they go). */
  override dispose(): void {
    super.dispose()
  }

  /** @internal */
  _inspect(): Record<string, unknown> {
    return { layers: this.layers, isGraph: this.isGraph }
  }
}

/**
 * Captures one decode step of `opts.kvCaches.length` layers on `device` (see
 * {@link CapturedStep}). On CUDA the step runs once (kernels load) and is captured into a
 * graph; nothing is captured on the CPU backend.
 */
export function captureStep(device: Device, opts: CaptureOptions): CapturedStep {
  const d = want(device, Device, 'device')
  if (opts == null || typeof opts !== 'object') fail('ERR_INVALID_ARGUMENT', `opts: expected capture options, got ${describe(opts)}`)
  if (!Array.isArray(opts.kvCaches) || opts.kvCaches.length === 0)
    fail('ERR_INVALID_ARGUMENT', `kvCaches: expected one pool per layer (at least one), got ${show(opts.kvCaches)}`)
  const kv = opts.kvCaches.map((k, i) => (k instanceof KvCache ? k.tensor : want(k, Tensor, `kvCaches[${i}]`)))
  const { batch, maxBlocksPerSeq, sQ = 1, hQ } = opts
  int('batch', batch, 1, MAX_EXTENT)
  int('maxBlocksPerSeq', maxBlocksPerSeq, 1, MAX_BLOCKS_PER_SEQ)
  int('sQ', sQ, 1, MAX_I32)
  int('hQ', hQ, 1, MAX_I32)
  if (opts.causal != null && typeof opts.causal !== 'boolean')
    fail('ERR_INVALID_ARGUMENT', `causal: expected a boolean, got ${describe(opts.causal)}`)
  if (opts.softmaxScale != null && typeof opts.softmaxScale !== 'number')
    fail('ERR_INVALID_ARGUMENT', `softmaxScale: expected a number, got ${describe(opts.softmaxScale)}`)
  if (opts.label != null && typeof opts.label !== 'string')
    fail('ERR_INVALID_ARGUMENT', `label: expected a string, got ${describe(opts.label)}`)
  if (opts.batchInvariant != null && typeof opts.batchInvariant !== 'boolean')
    fail('ERR_INVALID_ARGUMENT', `batchInvariant: expected a boolean, got ${describe(opts.batchInvariant)}`)
  const dtype = opts.dtype ?? kv[0]!.dtype
  return CapturedStep._wrap(
    call(() =>
      native.captureStep(
        d._n,
        kv.map((t) => t._n),
        batch,
        maxBlocksPerSeq,
        sQ,
        hQ,
        dtype,
        opts.causal ?? undefined,
        opts.softmaxScale ?? undefined,
        opts.label ?? undefined,
        opts.batchInvariant ?? undefined,
      ),
    ),
  )
}
