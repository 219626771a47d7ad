/**
 * The contract's formulas ({@link decodeBytes}, {@link decodeFlops}) and the benchmarks
 * (`bench`): the engine of `npx mla-decode bench`, `--host` and `--host-breakdown`.
 */

import { int, MAX_I32, describe, show, want } from './check'
import { BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V } from './constants'
import { bf16ToF32, f32ToBf16 } from './convert'
import { KvCache } from './cache'
import { AWAIT_SPIN_US, _setAwaitSpinUs, decode, decodeInto, decodeSync, whenDone, type DecodeArgs } from './decode'
import { Device, type HalfDType } from './device'
import { call, callAsync, fail } from './errors'
import { native } from './native'
import type * as Native from '../binding'
import type { Plan } from './plan'
import { captureStep } from './step'
import type { Tensor } from './tensor'

// ---------------------------------------------------------------------------------------
// Measuring (the contract's formulas)

// One home for the formulas: the core's `bench::metrics`, through the binding (the Rust
// benchmarks and the CLI's columns use the same functions).

/** Bytes moved by one decode step: (sum(seqlens) * 576 + b*sQ*hQ*576 + b*sQ*hQ*512) * 2. */
export function decodeBytes(seqlens: ArrayLike<number>, sQ: number, hQ: number): number {
  return native.benchDecodeBytes(lensArg('seqlens', seqlens), int('sQ', sQ, 0, MAX_I32), int('hQ', hQ, 0, MAX_I32))
}

/** Floating-point operations of one decode step: 2 * sQ * sum(seqlens) * hQ * (576 + 512). */
export function decodeFlops(seqlens: ArrayLike<number>, sQ: number, hQ: number): number {
  return native.benchDecodeFlops(lensArg('seqlens', seqlens), int('sQ', sQ, 0, MAX_I32), int('hQ', hQ, 0, MAX_I32))
}

/** `bytes` moved in `ms` milliseconds, in GB/s (1e9 bytes per second). @internal */
export const gbps = (bytes: number, ms: number): number => native.benchGbps(bytes, ms)
/** `flops` done in `ms` milliseconds, in TFLOPS (1e12 per second). @internal */
export const tflops = (flops: number, ms: number): number => native.benchTflops(flops, ms)
/**
 * The floor of a step in ms: its bytes at the copy ceiling (GB/s), or its FLOPs at the
 * matmul ceiling (TFLOPS) when that is finite, the larger. @internal
 */
export const floorMs = (bytes: number, flops: number, copyGbps: number, matmulTflops: number): number =>
  native.benchFloorMs(bytes, flops, copyGbps, Number.isFinite(matmulTflops) ? matmulTflops : undefined)

/**
 * A bench configuration as the binding takes it. Counts go to the binding as u32 / i32:
 * checked here, where 1.5 or -1 would be truncated or wrapped there. Their meaning (b >= 1,
 * lens.length == b, ...) is checked natively.
 */
function nativeConfig(config: bench.Config): Native.BenchConfig {
  for (const k of ['b', 'sQ', 'mean', 'hQ'] as const) int(`config.${k}`, config[k], 0, MAX_I32)
  if (config.lens != null) {
    if (!Array.isArray(config.lens)) fail('ERR_INVALID_ARGUMENT', `config.lens: expected an array of lengths, got ${show(config.lens)}`)
    config.lens.forEach((l, i) => int(`config.lens[${i}]`, l, 0, MAX_I32))
  }
  const c: Native.BenchConfig = {
    tag: config.tag,
    b: config.b,
    sQ: config.sQ,
    mean: config.mean,
    hQ: config.hQ,
    varlen: config.varlen,
    label: config.label ?? '',
    flashmlaShape: config.flashmlaShape ?? false,
  }
  if (config.lens) c.lens = config.lens
  return c
}

function lensArg(name: string, seqlens: ArrayLike<number>): number[] {
  if (seqlens == null || typeof (seqlens as ArrayLike<number>).length !== 'number') {
    fail('ERR_INVALID_ARGUMENT', `${name}: expected an array of lengths, got ${describe(seqlens)}`)
  }
  return Array.from(seqlens, (l, i) => int(`${name}[${i}]`, l, 0, MAX_I32))
}

// ---------------------------------------------------------------------------------------
// Benchmark (the engine of `npx mla-decode bench`)

/**
 * The contract's benchmark, one configuration at a time (the `mla-decode bench` command
 * is built on it). Times are medians of timed decode steps after warm-up (CUDA events on
 * CUDA, a wall clock on the CPU backend) on random inputs, with block tables that map
 * each sequence to its own blocks; rates use the contract's formulas
 * ({@link decodeBytes}, {@link decodeFlops}).
 *
 * @example
 * ```ts
 * import { Device, bench } from 'mla-decode'
 * using dev = Device.open()
 * console.log('copy ceiling', await bench.copyCeiling(dev), 'GB/s')
 * for (const c of bench.configs(bench.defaultSuite(dev), { quick: true })) {
 *   const m = await bench.run(dev, c)
 *   console.log(c.label, m.ms.toFixed(3), 'ms', m.gbps.toFixed(0), 'GB/s')
 * }
 * ```
 */
export namespace bench {
  /**
   * A suite of configurations: `'flashmla'` (FlashMLA's grid: b = 128, mean length 4096,
   * 8192, 16384, h_q 16..128, s_q 1 and 2, fixed and variable lengths; then its
   * beyond-grid shapes: short contexts, an imbalanced batch, multi-token prediction),
   * `'cpu'` (a reduced grid for the CPU backend: b = 8, means 1024 and 4096, h_q 16 and
   * 128) or `'tiny'` (a few small shapes, for tests).
   */
  export type Suite = 'flashmla' | 'cpu' | 'tiny'

  /** One benchmark shape. */
  export interface Config {
    /** `'grid'`, `'short'`, `'imbalanced'`, `'mtp'` (FlashMLA's names) or another tag. */
    tag: string
    /** Batch size. */
    b: number
    /** Query tokens per sequence. */
    sQ: number
    /** Mean cache length (0 when `lens` is given). */
    mean: number
    /** Query heads. */
    hQ: number
    /** Lengths drawn from Normal(mean, mean / 2), clamped to >= sQ (a fixed seed). */
    varlen: boolean
    /** Exact lengths (b of them). */
    lens?: number[]
    /** `'tag/sQ/mean/hQ/varlen'`, e.g. `'grid/1/4096/64/0'`: the anchors' key. */
    label: string
    /** Whether this is one of FlashMLA's own shapes (one the anchor times apply to). */
    flashmlaShape: boolean
  }

  /** The result of {@link bench.run}. */
  export interface Measurement {
    /** Median time of one decode step, milliseconds. */
    ms: number
    /** Fastest timed run, milliseconds. */
    minMs: number
    /** Slowest timed run, milliseconds. */
    maxMs: number
    /** Timed runs. */
    reps: number
    /** Batch size measured. */
    b: number
    /** Sum of the cache lengths measured. */
    totalSeqlen: number
    /** The contract's bytes of one step: (sum(seqlens) * 576 + b*sQ*hQ*576 + b*sQ*hQ*512) * 2. */
    bytes: number
    /** The contract's FLOPs of one step: 2 * sQ * sum(seqlens) * hQ * (576 + 512). */
    flops: number
    /** bytes / median time, 1e9 bytes per second. */
    gbps: number
    /** flops / median time, 1e12 per second. */
    tflops: number
    /** With {@link RunOptions.batchInvariant}: the default plan's median time on the same inputs, milliseconds. */
    defaultMs?: number
  }

  /** Options of {@link bench.run}. */
  export interface RunOptions {
    /** Timed runs (default 30 on CUDA, 5 on the CPU backend). */
    reps?: number
    /** Element type of q, the cache and out (default `'bf16'`). */
    dtype?: HalfDType
    /** Seed of the random lengths and inputs (default: the benchmark's fixed seed). */
    seed?: number
    /**
     * Measure a batch-invariant plan ({@link Plan.batchInvariant}), and the default plan on
     * the same inputs with the timed runs alternating ({@link Measurement.defaultMs}).
     */
    batchInvariant?: boolean
  }

  /** The configurations of a suite, in order. `quick`: `'flashmla'` with mean 4096 only; `'cpu'` with mean 1024 only. */
  export function configs(suite: Suite, opts: { quick?: boolean } = {}): Config[] {
    if (typeof suite !== 'string') fail('ERR_INVALID_ARGUMENT', `suite: expected a string, got ${describe(suite)}`)
    return call(() => native.benchConfigs(suite, opts.quick ?? false)).map(fromNative)
  }

  /** The suite that fits a device: `'flashmla'` on CUDA, `'cpu'` on the CPU backend. */
  export function defaultSuite(device: Device): Suite {
    return call(() => native.benchDefaultSuite(want(device, Device, 'device')._n)) as Suite
  }

  /**
   * Measures one configuration off the JS thread: random inputs, one plan, warm-up, then
   * the median of `reps` timed decode steps (causal).
   */
  export function run(device: Device, config: Config, opts: RunOptions = {}): Promise<Measurement> {
    const d = want(device, Device, 'device')._n
    return callAsync(() => {
      if (config == null || typeof config !== 'object') fail('ERR_INVALID_ARGUMENT', `config: expected a bench.Config, got ${show(config)}`)
      if (opts == null || typeof opts !== 'object') fail('ERR_INVALID_ARGUMENT', `opts: expected an options object, got ${show(opts)}`)
      const c = nativeConfig(config)
      if (opts.reps !== undefined) int('reps', opts.reps, 1, MAX_I32)
      if (opts.seed !== undefined) int('seed', opts.seed, 0, Number.MAX_SAFE_INTEGER)
      if (opts.batchInvariant != null && typeof opts.batchInvariant !== 'boolean')
        fail('ERR_INVALID_ARGUMENT', `batchInvariant: expected a boolean, got ${describe(opts.batchInvariant)}`)
      return call(() => native.benchRun(d, c, opts.reps, opts.dtype, opts.seed, opts.batchInvariant ?? undefined))
    })
  }

  /**
   * The copy ceiling of a device in GB/s (bytes read + written), measured off the JS
   * thread: 1 GiB device-to-device on CUDA, a 256 MiB host copy on the CPU backend.
   */
  export function copyCeiling(device: Device): Promise<number> {
    const d = want(device, Device, 'device')._n
    return callAsync(() => call(() => native.benchCopyCeiling(d)))
  }

  /**
   * FlashMLA's times (ms) from an anchors CSV, keyed by {@link bench.Config.label}. Reads
   * the grid format (`peer,b,s_q,mean_sk,h_q,varlen,ms,...`) and the beyond format
   * (`tag,peer,b,s_q,mean_sk,h_q,ms,...`); only `flashmla` rows.
   */
  export function loadAnchors(csvText: string): Map<string, number> {
    if (typeof csvText !== 'string') fail('ERR_INVALID_ARGUMENT', `csvText: expected a string, got ${describe(csvText)}`)
    return new Map(Object.entries(call(() => native.benchLoadAnchors(csvText))))
  }

  /** The anchor time of a configuration, when it is FlashMLA's shape and the anchors have it. */
  export function anchorFor(anchors: ReadonlyMap<string, number>, config: Config): number | undefined {
    return config.flashmlaShape ? anchors.get(config.label) : undefined
  }

  function fromNative(c: Native.BenchConfig): Config {
    const r: Config = {
      tag: c.tag,
      b: c.b,
      sQ: c.sQ,
      mean: c.mean,
      hQ: c.hQ,
      varlen: c.varlen,
      label: c.label,
      flashmlaShape: c.flashmlaShape,
    }
    if (c.lens != null) r.lens = c.lens
    return r
  }
}

// ---------------------------------------------------------------------------------------
// The host benchmark (the engine of `npx mla-decode bench --host`)

/**
 * The host benchmark: how close a decode step driven from TypeScript comes to the kernels'
 * own time, in each way of driving it, plus the host cost of the calls around a step
 * (appending the new tokens, block tables, plans).
 *
 * @example
 * ```ts
 * import { Device, bench } from 'mla-decode'
 * using dev = Device.open()
 * for (const c of bench.hostConfigs(dev, { quick: true })) {
 *   const { rows } = await bench.runHost(dev, c, { steps: 50 })
 *   for (const r of rows) console.log(r.b, r.hQ, r.layers, r.mode, r.kernelUs.toFixed(1), r.stepUs.toFixed(1))
 * }
 * ```
 */
export namespace bench {
  /**
   * How a step is driven: `await` (`await decode(...)` per layer, allocating outputs),
   * `sync` (`decodeSync` per layer), `enqueue` ({@link decodeInto} per layer into fixed
   * outputs, then one `synchronizeSync`), `graph` (one replay of a captured step, then one
   * `synchronizeSync`). Every mode re-plans once per step (`plan.update`; the graph holds
   * its plan kernel).
   */
  export type HostMode = 'await' | 'sync' | 'enqueue' | 'graph'
  export const HOST_MODES: readonly HostMode[] = Object.freeze(['await', 'sync', 'enqueue', 'graph'] as const)

  /** A shape of the host benchmark: b sequences of `length` tokens, `layers` decodes per step. */
  export interface HostConfig {
    b: number
    hQ: number
    sQ: number
    length: number
    layers: number
  }

  /** One row of `host.csv`: the median step of a mode, per layer, next to the kernels' time. */
  export interface HostRow extends HostConfig {
    mode: HostMode
    /** The kernels' own time of one layer (plan amortised), µs ({@link bench.hostKernelUs}). */
    kernelUs: number
    /** Median wall time of one step divided by `layers`, µs. */
    stepUs: number
  }

  /** One row of `host-ops.csv`: the median host time of a call around a step, µs. */
  export interface HostOp {
    b: number
    hQ: number
    sQ: number
    length: number
    /** `append-loop` (one `append` per sequence), `appendBatch` (host bf16 bits), `appendBatch-device` (rows from a tensor), `appendBatch-f32` (host f32 rows, rounded on the way), `batch`, `batchInto`, `plan`, `plan.update`. */
    op: string
    us: number
  }

  /** The host benchmark's shapes: on CUDA issue 9's table with 1 and 8 layers; on the CPU backend small shapes. */
  export function hostConfigs(device: Device, opts: { quick?: boolean } = {}): HostConfig[] {
    return call(() => native.benchHostConfigs(want(device, Device, 'device')._n, opts.quick ?? false))
  }

  /** The kernels' own time of one layer of `config`, µs (CUDA events, launch gaps excluded; CPU: wall time). */
  export function hostKernelUs(device: Device, config: HostConfig, reps?: number): Promise<number> {
    const d = want(device, Device, 'device')._n
    return callAsync(async () => {
      for (const k of ['b', 'hQ', 'sQ', 'length', 'layers'] as const) int(`config.${k}`, config?.[k], 1, MAX_I32)
      if (reps !== undefined) int('reps', reps, 1, MAX_I32)
      return call(() =>
        native.benchHostKernelUs(d, { b: config.b, hQ: config.hQ, sQ: config.sQ, length: config.length, layers: config.layers }, reps),
      )
    })
  }

  /** Options of {@link bench.runHost}. */
  export interface HostOptions {
    /** Modes to measure (default all; `graph` where the device can capture steps). */
    modes?: readonly HostMode[]
    /** Timed steps per mode (default 200 on CUDA, 10 on the CPU), after `warmup` untimed ones (default 10 / 2). */
    steps?: number
    warmup?: number
    /** Also measure the calls around a step ({@link bench.HostOp}); default true. */
    ops?: boolean
  }

  function median(xs: number[]): number {
    const v = [...xs].sort((a, b) => a - b)
    return v[Math.floor(v.length / 2)] ?? NaN
  }

  function now(): number {
    return Number(process.hrtime.bigint()) / 1e3
  }

  /** bf16 bits of values ~N(0, 0.1) (a cheap LCG; only the timing matters). */
  function randomBits(n: number, seed: number): Uint16Array {
    const f = new Float32Array(n)
    let s = seed >>> 0 || 1
    for (let i = 0; i < n; i++) {
      s = (Math.imul(s, 1664525) + 1013904223) >>> 0
      f[i] = ((s >>> 8) / 16777216 - 0.5) * 0.35
    }
    return f32ToBf16(f)
  }

  /**
   * Measures one host-benchmark shape on `device` through this API: fills a paged cache
   * with `length` random tokens per sequence, then for each mode times `steps` steps of
   * `layers` decodes (causal, bf16) and reports the median per layer next to the kernels'
   * own time; with `ops`, also the host time of the calls around a step.
   */
  export async function runHost(device: Device, config: HostConfig, opts: HostOptions = {}): Promise<{ rows: HostRow[]; ops: HostOp[] }> {
    const dev = want(device, Device, 'device')
    for (const k of ['b', 'hQ', 'sQ', 'length', 'layers'] as const) int(`config.${k}`, config?.[k], 1, MAX_I32)
    const cudaDev = dev.kind === 'cuda'
    const steps = opts.steps ?? (cudaDev ? 200 : 10)
    const warmup = opts.warmup ?? (cudaDev ? 10 : 2)
    int('steps', steps, 1, MAX_I32)
    int('warmup', warmup, 0, MAX_I32)
    const modes = opts.modes ?? HOST_MODES
    const { b, hQ, sQ, length, layers } = config
    const opReps = cudaDev ? 30 : 5
    const width = Math.ceil((length + 4 * (opReps + 2)) / BLOCK_SIZE)
    using cache = new KvCache(dev, { numBlocks: b * (width + 1), dtype: 'bf16' })
    const seqs = Array.from({ length: b }, () => cache.createSequence())
    const chunk = randomBits(b * Math.min(length, BLOCK_SIZE) * HEAD_DIM, 0x5eed ^ b)
    for (let done = 0; done < length; done += BLOCK_SIZE) {
      const n = Math.min(BLOCK_SIZE, length - done)
      cache.appendBatch(seqs, chunk.subarray(0, b * n * HEAD_DIM))
    }
    const { blockTable, cacheSeqlens } = cache.batch(seqs, width)
    const qBits = randomBits(b * sQ * hQ * HEAD_DIM, 0x9e37 ^ hQ)
    const qs = Array.from({ length: layers }, () => dev.tensor(qBits, [b, sQ, hQ, HEAD_DIM], 'bf16'))
    const outs = qs.map(() => ({ out: dev.zeros([b, sQ, hQ, HEAD_DIM_V], 'bf16'), lse: dev.zeros([b, hQ, sQ], 'fp32') }))
    using plan = dev.plan(cacheSeqlens, { sQ, hQ })
    await dev.synchronize()
    const kernelUs = await hostKernelUs(dev, config)
    const args = (l: number): DecodeArgs => ({ q: qs[l]!, kvCache: cache, blockTable, cacheSeqlens, plan, causal: true })

    const rows: HostRow[] = []
    const time = async (step: () => Promise<void> | void): Promise<number> => {
      for (let i = 0; i < warmup; i++) await step()
      const ts: number[] = []
      for (let i = 0; i < steps; i++) {
        const t0 = now()
        await step()
        ts.push(now() - t0)
      }
      return median(ts) / layers
    }
    for (const mode of modes) {
      let stepUs: number
      switch (mode) {
        case 'await':
          stepUs = await time(async () => {
            plan.update(cacheSeqlens)
            for (let l = 0; l < layers; l++) {
              const r = await decode(args(l))
              r.out.dispose()
              r.lse.dispose()
            }
          })
          break
        case 'sync':
          stepUs = await time(() => {
            plan.update(cacheSeqlens)
            for (let l = 0; l < layers; l++) {
              const r = decodeSync(args(l))
              r.out.dispose()
              r.lse.dispose()
            }
          })
          break
        case 'enqueue':
          stepUs = await time(() => {
            plan.update(cacheSeqlens)
            for (let l = 0; l < layers; l++) decodeInto(args(l), outs[l]!)
            dev.synchronizeSync()
          })
          break
        case 'graph': {
          using step = captureStep(dev, { kvCaches: qs.map(() => cache), batch: b, maxBlocksPerSeq: width, sQ, hQ, causal: true })
          step.setBatch(cache, seqs)
          for (let l = 0; l < layers; l++) step.q(l).copyFrom(qs[l]!)
          stepUs = await time(() => {
            step.replay()
            dev.synchronizeSync()
          })
          break
        }
      }
      rows.push({ b, hQ, sQ, length, layers, mode, kernelUs, stepUs })
    }

    const ops: HostOp[] = []
    if (opts.ops ?? true) {
      const row = randomBits(HEAD_DIM, 7)
      const rowsB = randomBits(b * HEAD_DIM, 8)
      const rowsT = dev.tensor(rowsB, [b, 1, HEAD_DIM], 'bf16')
      const rowsF = bf16ToF32(rowsB)
      const op = (name: string, f: () => void, after?: () => void) => {
        const ts: number[] = []
        for (let i = 0; i < opReps + 2; i++) {
          const t0 = now()
          f()
          const t = now() - t0
          after?.()
          dev.synchronizeSync()
          if (i >= 2) ts.push(t)
        }
        ops.push({ b, hQ, sQ, length, op: name, us: median(ts) })
      }
      let made: { blockTable: Tensor; cacheSeqlens: Tensor } | undefined
      let madePlan: Plan | undefined
      op('append-loop', () => {
        for (const s of seqs) cache.append(s, row)
      })
      op('appendBatch', () => cache.appendBatch(seqs, rowsB))
      op('appendBatch-device', () => cache.appendBatch(seqs, rowsT))
      op('appendBatch-f32', () => cache.appendBatch(seqs, rowsF))
      op(
        'batch',
        () => (made = cache.batch(seqs, width)),
        () => {
          made?.blockTable.dispose()
          made?.cacheSeqlens.dispose()
        },
      )
      op('batchInto', () => cache.batchInto(seqs, blockTable, cacheSeqlens))
      op(
        'plan',
        () => (madePlan = dev.plan(cacheSeqlens, { sQ, hQ })),
        () => madePlan?.dispose(),
      )
      op('plan.update', () => plan.update(cacheSeqlens))
      rowsT.dispose()
    }
    for (const x of [...qs, ...outs.flatMap((o) => [o.out, o.lse]), blockTable, cacheSeqlens]) x.dispose()
    await dev.synchronize()
    return { rows, ops }
  }

  /** One row of `host-breakdown.csv`: the median time between two consecutive marks of a call. */
  export interface HostPhase {
    b: number
    hQ: number
    sQ: number
    length: number
    /** `await` (polled completion), `await-pool` (the wait on the libuv pool), `enqueue` (plan.update + decodeInto + synchronizeSync), `appendBatch`, `appendBatch-device`, `appendBatch-f32`; `stub-poll` / `stub-pool`: the two completion paths around a stand-in wait of 30 or 500 µs, no GPU work. */
    mode: string
    /** `from -> to`: two consecutive marks (`js:*` in src/, `native:*` in the binding, the rest in the core); a repeated mark gets `#2`, `#3`. */
    phase: string
    /** Median µs over the calls that had this phase. */
    us: number
    /** Calls that had it. */
    n: number
  }

  function phasesOf(mode: string, config: HostConfig, labels: string[], ns: number[], starts: (l: string) => boolean): HostPhase[] {
    // Split the log into calls (each begins at a start mark), name the gaps between
    // consecutive marks, and take the median of each gap over the calls.
    const gaps = new Map<string, number[]>()
    let seen = new Map<string, number>()
    let prev: string | undefined
    let prevT = 0
    for (let i = 0; i < labels.length; i++) {
      const l = labels[i]!
      if (starts(l)) {
        seen = new Map()
        prev = undefined
      }
      const k = (seen.get(l) ?? 0) + 1
      seen.set(l, k)
      const name = k > 1 ? `${l}#${k}` : l
      if (prev !== undefined) {
        const key = `${prev} -> ${name}`
        let v = gaps.get(key)
        if (v === undefined) gaps.set(key, (v = []))
        v.push((ns[i]! - prevT) / 1e3)
      }
      prev = name
      prevT = ns[i]!
    }
    const { b, hQ, sQ, length } = config
    return [...gaps.entries()].map(([phase, v]) => ({ b, hQ, sQ, length, mode, phase, us: median(v), n: v.length }))
  }

  /**
   * Where the host time of one call goes (the engine of `npx mla-decode bench
   * --host-breakdown`): runs `calls` calls of each mode on one layer of `config` with the
   * phase marks on (`mla_core::trace`, CLOCK_MONOTONIC like `process.hrtime`), and reports
   * the median gap between consecutive marks. Also the two completion paths of an awaited
   * decode around a stand-in wait (`stub-*`), which need no GPU.
   */
  export async function runHostBreakdown(
    device: Device,
    config: HostConfig,
    opts: { calls?: number; warmup?: number } = {},
  ): Promise<{ phases: HostPhase[]; info: string }> {
    const dev = want(device, Device, 'device')
    for (const k of ['b', 'hQ', 'sQ', 'length'] as const) int(`config.${k}`, config?.[k], 1, MAX_I32)
    const cudaDev = dev.kind === 'cuda'
    const calls = opts.calls ?? (cudaDev ? 200 : 20)
    const warmup = opts.warmup ?? (cudaDev ? 20 : 2)
    int('calls', calls, 1, MAX_I32)
    int('warmup', warmup, 0, MAX_I32)
    const { b, hQ, sQ, length } = config
    const width = Math.ceil((length + 3 * (calls + warmup) + 2) / BLOCK_SIZE)
    using cache = new KvCache(dev, { numBlocks: b * (width + 1), dtype: 'bf16' })
    const seqs = Array.from({ length: b }, () => cache.createSequence())
    const chunk = randomBits(b * Math.min(length, BLOCK_SIZE) * HEAD_DIM, 0x5eed ^ b)
    for (let done = 0; done < length; done += BLOCK_SIZE) {
      const n = Math.min(BLOCK_SIZE, length - done)
      cache.appendBatch(seqs, chunk.subarray(0, b * n * HEAD_DIM))
    }
    const { blockTable, cacheSeqlens } = cache.batch(seqs, width)
    using q = dev.tensor(randomBits(b * sQ * hQ * HEAD_DIM, 0x9e37 ^ hQ), [b, sQ, hQ, HEAD_DIM], 'bf16')
    using out = dev.zeros([b, sQ, hQ, HEAD_DIM_V], 'bf16')
    using lse = dev.zeros([b, hQ, sQ], 'fp32')
    using plan = dev.plan(cacheSeqlens, { sQ, hQ })
    const rowsB = randomBits(b * HEAD_DIM, 8)
    using rowsT = dev.tensor(rowsB, [b, 1, HEAD_DIM], 'bf16')
    const rowsF = bf16ToF32(rowsB)
    await dev.synchronize()
    const args: DecodeArgs = { q, kvCache: cache, blockTable, cacheSeqlens, plan, causal: true }
    const mark = (l: string) => native.benchTraceMark(l)
    const phases: HostPhase[] = []
    const run = async (mode: string, one: () => Promise<void> | void, start = 'js:call') => {
      for (let i = 0; i < warmup; i++) await one()
      await dev.synchronize()
      native.benchTrace(true)
      try {
        for (let i = 0; i < calls; i++) await one()
      } finally {
        const log = native.benchTraceTake()
        native.benchTrace(false)
        phases.push(...phasesOf(mode, config, log.labels, log.ns, (l) => l === start))
      }
      await dev.synchronize()
    }
    const awaited = async () => {
      mark('js:call')
      const r = await decode(args)
      mark('js:resumed')
      r.out.dispose()
      r.lse.dispose()
      mark('js:disposed')
    }
    try {
      await run('await', awaited)
      _setAwaitSpinUs(0)
      await run('await-pool', awaited)
    } finally {
      _setAwaitSpinUs(undefined)
    }
    await run('enqueue', () => {
      mark('js:call')
      plan.update(cacheSeqlens)
      mark('js:updated')
      decodeInto(args, { out, lse })
      mark('js:enqueued')
      dev.synchronizeSync()
      mark('js:done')
    })
    for (const [mode, rows] of [
      ['appendBatch', rowsB],
      ['appendBatch-device', rowsT],
      ['appendBatch-f32', rowsF],
    ] as const) {
      await run(mode, () => {
        mark('js:call')
        cache.appendBatch(seqs, rows)
        mark('js:done')
      })
    }
    // The completion paths alone, around a stand-in wait (no GPU work): a pool task that
    // spins until the deadline, against the event-loop poller.
    for (const us of [30, 500]) {
      const pool: number[] = []
      const poll: number[] = []
      for (let i = 0; i < calls + warmup; i++) {
        const deadline = await native.benchCompletionStub(us)
        const t1 = native.benchNowNs()
        const d2 = native.benchNowNs() + us * 1e3
        await whenDone(
          () => native.benchNowNs() >= d2,
          () => Promise.resolve(),
          1e6,
        )
        const t2 = native.benchNowNs()
        if (i >= warmup) {
          pool.push((t1 - deadline) / 1e3)
          poll.push((t2 - d2) / 1e3)
        }
      }
      phases.push({ b, hQ, sQ, length, mode: 'stub-pool', phase: `wait ${us} us: done -> js:resumed`, us: median(pool), n: pool.length })
      phases.push({ b, hQ, sQ, length, mode: 'stub-poll', phase: `wait ${us} us: done -> js:resumed`, us: median(poll), n: poll.length })
    }
    blockTable.dispose()
    cacheSeqlens.dispose()
    await dev.synchronize()
    const info = `${call(() => native.benchHostPathInfo(dev._n))}; MLA_AWAIT_SPIN_US ${AWAIT_SPIN_US}`
    return { phases, info }
  }
}

// ---------------------------------------------------------------------------------------
// Several GPUs at once (the engine of `npx mla-decode bench --devices`; issue 12)

export namespace bench {
  /** One device's timed steps in {@link bench.runMulti}. */
  export interface DeviceRun {
    /** The CUDA ordinal. */
    ordinal: number
    name: string
    /** Median time of its steps, milliseconds, and the rates at the median. */
    ms: number
    gbps: number
    tflops: number
    /** From the barrier to its last step done, milliseconds. */
    wallMs: number
  }

  /** The result of {@link bench.runMulti}. */
  export interface MultiMeasurement {
    /** The first device alone (the others idle): the same inputs and loop. */
    alone: DeviceRun
    /** Every device, all at once, in the order given. */
    devices: DeviceRun[]
    /** Timed steps per device. */
    reps: number
    /** From the barrier to the last device done, milliseconds. */
    wallMs: number
    /** Bytes and FLOPs of every device's steps together. */
    bytes: number
    flops: number
    /** The aggregate: bytes / wall span (GB/s), flops / wall span (TFLOPS). */
    gbps: number
    tflops: number
    /** The first device alone: its steps' bytes over its own wall span (GB/s). */
    aloneGbps: number
    /** gbps / aloneGbps: the total throughput in units of one GPU's. */
    scaling: number
  }

  /**
   * The CUDA ordinals of a device selection: `'all'` (every usable CUDA device) or a list
   * like `'0,1'`. `'all'` without a usable CUDA device throws `ERR_GPU_UNAVAILABLE` (never
   * the CPU backend); a malformed list `ERR_INVALID_ARGUMENT`.
   */
  export function resolveDevices(spec: string): number[] {
    if (typeof spec !== 'string') fail('ERR_INVALID_ARGUMENT', `devices: expected a string, got ${describe(spec)}`)
    return call(() => native.benchResolveDevices(spec))
  }

  /**
   * Runs one configuration on several CUDA devices at once, off the JS thread: one native
   * thread per device, each with its own inputs (the same seed), plan and stream; the first
   * device alone first, then all together after a barrier. Each device's steps are timed
   * back to back with CUDA events; the total is the bytes of every device's steps over the
   * wall span (barrier to the last device done), the scaling that total over the first
   * device's alone. One device works too (scaling about 1).
   *
   * @example
   * ```ts
   * using d0 = Device.open('cuda:0')
   * using d1 = Device.open('cuda:1')
   * const c = bench.configs('flashmla').find((c) => c.label === 'grid/1/16384/16/0')!
   * const m = await bench.runMulti([d0, d1], c)
   * console.log(m.gbps.toFixed(0), 'GB/s in total', m.scaling.toFixed(2) + 'x one GPU')
   * ```
   */
  export function runMulti(
    devices: Device[],
    config: Config,
    opts: { reps?: number; dtype?: HalfDType; seed?: number } = {},
  ): Promise<MultiMeasurement> {
    return callAsync(() => {
      if (!Array.isArray(devices) || devices.length === 0)
        fail('ERR_INVALID_ARGUMENT', `devices: expected a non-empty array of CUDA devices, got ${show(devices)}`)
      const ordinals = devices.map((d, i) => {
        const dev = want(d, Device, `devices[${i}]`)
        if (dev.kind !== 'cuda') fail('ERR_INVALID_ARGUMENT', `devices[${i}]: expected a CUDA device, got ${dev.kind}`)
        return dev.info.ordinal
      })
      if (config == null || typeof config !== 'object') fail('ERR_INVALID_ARGUMENT', `config: expected a bench.Config, got ${show(config)}`)
      const c = nativeConfig(config)
      if (opts.reps !== undefined) int('reps', opts.reps, 1, MAX_I32)
      if (opts.seed !== undefined) int('seed', opts.seed, 0, Number.MAX_SAFE_INTEGER)
      return call(() => native.benchRunMulti(ordinals, c, opts.reps, opts.dtype, opts.seed))
    })
  }
}
