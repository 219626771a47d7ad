// Shared test helpers: seeded random inputs shaped like the contract's cases, a float64
// reference decode, accuracy checks, and a TypeScript port of the plan scheduler.
//
// Inputs are fresh each run; the seed is printed (t.log) and MLA_TEST_SEED=<n> replays it.

import type { ExecutionContext } from 'ava'
import {
  BLOCK_SIZE,
  DEFAULT_SOFTMAX_SCALE,
  ERROR_CODES,
  HEAD_DIM,
  HEAD_DIM_V,
  bf16ToF32,
  f16ToF32,
  f32ToBf16,
  f32ToF16,
  MlaError,
  type Device,
  type ErrorCode,
  type HalfDType,
} from '../index'
import { native } from '../src/native'

/** Expects `f` to throw / reject an MlaError with `code` whose message mentions `mention`. */
export async function expectCode(t: ExecutionContext, f: () => unknown, code: ErrorCode, mention?: string): Promise<void> {
  let err: unknown
  try {
    await f()
  } catch (e) {
    err = e
  }
  if (!(err instanceof MlaError)) {
    t.fail(`expected MlaError ${code}, got ${err === undefined ? 'no error' : String(err)}`)
    return
  }
  t.is(err.code, code, err.message)
  t.true(ERROR_CODES.includes(err.code))
  t.true(err instanceof Error)
  t.is(err.name, 'MlaError')
  if (mention) t.true(err.message.includes(mention), `message "${err.message}" should mention "${mention}"`)
}

export const D = HEAD_DIM
export const DV = HEAD_DIM_V
/** An unspecified block-table entry past a sequence's blocks (the contract's example). */
export const GARBAGE = 2147480000

export const BASE_SEED: number = process.env.MLA_TEST_SEED ? Number(process.env.MLA_TEST_SEED) : (Date.now() ^ (process.pid << 10)) >>> 0

/** mulberry32: a small, fast, seedable PRNG. */
export class Rng {
  private s: number
  private spare: number | null = null
  constructor(seed: number) {
    this.s = seed >>> 0
  }
  /** Uniform in [0, 1). */
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0)
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n)
  }
  /** Standard normal (Box-Muller). */
  normal(): number {
    if (this.spare !== null) {
      const s = this.spare
      this.spare = null
      return s
    }
    let u = 0
    while (u === 0) u = this.next()
    const v = this.next()
    const r = Math.sqrt(-2 * Math.log(u))
    this.spare = r * Math.sin(2 * Math.PI * v)
    return r * Math.cos(2 * Math.PI * v)
  }
  shuffle<T>(a: T[]): T[] {
    for (let i = a.length - 1; i > 0; i--) {
      const j = this.int(i + 1)
      ;[a[i], a[j]] = [a[j]!, a[i]!]
    }
    return a
  }
}

/** 'scaled': N(0,1)/10 clamped to [-1, 1]; 'plain': N(0,1). */
export type Dist = 'scaled' | 'plain'

export function sample(rng: Rng, dist: Dist): number {
  const x = rng.normal()
  return dist === 'plain' ? x : Math.max(-1, Math.min(1, x / 10))
}

export function randomF32(rng: Rng, n: number, dist: Dist): Float32Array {
  const a = new Float32Array(n)
  for (let i = 0; i < n; i++) a[i] = sample(rng, dist)
  return a
}

export function toBits(x: Float32Array, dtype: HalfDType): Uint16Array {
  return dtype === 'bf16' ? f32ToBf16(x) : f32ToF16(x)
}

export function fromBits(x: Uint16Array, dtype: HalfDType): Float32Array {
  return dtype === 'bf16' ? bf16ToF32(x) : f16ToF32(x)
}

/** One accuracy case of the contract. */
export interface CaseCfg {
  name: string
  dtype: HalfDType
  sQ: number
  hQ: number
  seqlens: number[]
  causal: boolean
  softmaxScale?: number
}

/** Host data of one decode call, plus its f64 reference. */
export interface CaseData {
  cfg: CaseCfg
  dist: Dist
  seed: number
  b: number
  numBlocks: number
  maxBlocksPerSeq: number
  /** q bits [b, sQ, hQ, 576]. */
  qBits: Uint16Array
  /** Pool bits [numBlocks, 64, 1, 576]: token rows random, every other row NaN. */
  kvBits: Uint16Array
  /** [b, maxBlocksPerSeq]: permuted distinct blocks, GARBAGE past each sequence's blocks. */
  blockTable: Int32Array
  seqlens: Int32Array
}

/**
 * Random inputs for `cfg`: blocks in a random permutation of the pool (plus spare blocks
 * nobody uses), GARBAGE block-table tails, NaN in every row that must not be read (rows
 * past the length in the last block, and unused blocks).
 */
export function makeCase(cfg: CaseCfg, dist: Dist, seed: number): CaseData {
  const rng = new Rng(seed)
  const b = cfg.seqlens.length
  const nb = cfg.seqlens.map((l) => Math.ceil(l / BLOCK_SIZE))
  const used = nb.reduce((a, x) => a + x, 0)
  const numBlocks = used + 3
  const maxBlocksPerSeq = Math.max(1, ...nb) + 1
  const perm = rng.shuffle([...Array(numBlocks).keys()])
  const blockTable = new Int32Array(b * maxBlocksPerSeq).fill(GARBAGE)
  const kv = new Float32Array(numBlocks * BLOCK_SIZE * D).fill(NaN)
  let next = 0
  for (let i = 0; i < b; i++) {
    for (let j = 0; j < nb[i]!; j++) blockTable[i * maxBlocksPerSeq + j] = perm[next++]!
    for (let t = 0; t < cfg.seqlens[i]!; t++) {
      const blk = blockTable[i * maxBlocksPerSeq + Math.floor(t / BLOCK_SIZE)]!
      const base = (blk * BLOCK_SIZE + (t % BLOCK_SIZE)) * D
      for (let k = 0; k < D; k++) kv[base + k] = sample(rng, dist)
    }
  }
  const q = randomF32(rng, b * cfg.sQ * cfg.hQ * D, dist)
  return {
    cfg,
    dist,
    seed,
    b,
    numBlocks,
    maxBlocksPerSeq,
    qBits: toBits(q, cfg.dtype),
    kvBits: toBits(kv, cfg.dtype),
    blockTable,
    seqlens: Int32Array.from(cfg.seqlens),
  }
}

/** The case's tensors on `dev`. */
export function caseTensors(dev: Device, c: CaseData) {
  return {
    q: dev.tensor(c.qBits, [c.b, c.cfg.sQ, c.cfg.hQ, D], c.cfg.dtype),
    kvCache: dev.tensor(c.kvBits, [c.numBlocks, BLOCK_SIZE, 1, D], c.cfg.dtype),
    blockTable: dev.tensor(c.blockTable, [c.b, c.maxBlocksPerSeq]),
    cacheSeqlens: dev.tensor(c.seqlens, [c.b]),
  }
}

export interface Reference {
  /** [b, sQ, hQ, 512]. */
  out: Float64Array
  /** [b, hQ, sQ]; +Infinity for rows that attend to no key. */
  lse: Float64Array
}

/** The float64 reference decode (inputs are the exact values of the 16-bit bits). */
export function referenceDecode(c: CaseData): Reference {
  const { b, cfg, maxBlocksPerSeq } = c
  const { sQ, hQ, causal } = cfg
  const scale = cfg.softmaxScale ?? DEFAULT_SOFTMAX_SCALE
  const q = Float64Array.from(fromBits(c.qBits, cfg.dtype))
  const kv = fromBits(c.kvBits, cfg.dtype)
  const out = new Float64Array(b * sQ * hQ * DV)
  const lse = new Float64Array(b * hQ * sQ)
  const scores = new Float64Array(Math.max(1, ...cfg.seqlens))
  const acc = new Float64Array(DV)
  for (let i = 0; i < b; i++) {
    const L = c.seqlens[i]!
    // Gather the sequence's rows as f64.
    const K = new Float64Array(L * D)
    for (let t = 0; t < L; t++) {
      const blk = c.blockTable[i * maxBlocksPerSeq + Math.floor(t / BLOCK_SIZE)]!
      const base = (blk * BLOCK_SIZE + (t % BLOCK_SIZE)) * D
      for (let k = 0; k < D; k++) K[t * D + k] = kv[base + k]!
    }
    for (let j = 0; j < sQ; j++) {
      const n = causal ? Math.min(L, Math.max(0, L - sQ + j + 1)) : L
      for (let h = 0; h < hQ; h++) {
        const qo = ((i * sQ + j) * hQ + h) * D
        const oo = ((i * sQ + j) * hQ + h) * DV
        const lo = (i * hQ + h) * sQ + j
        if (n === 0) {
          lse[lo] = Infinity
          continue // out stays 0
        }
        let m = -Infinity
        for (let t = 0; t < n; t++) {
          let s = 0
          const ko = t * D
          for (let k = 0; k < D; k++) s += q[qo + k]! * K[ko + k]!
          s *= scale
          scores[t] = s
          if (s > m) m = s
        }
        let sum = 0
        acc.fill(0)
        for (let t = 0; t < n; t++) {
          const p = Math.exp(scores[t]! - m)
          sum += p
          const ko = t * D
          for (let v = 0; v < DV; v++) acc[v] = acc[v]! + p * K[ko + v]!
        }
        for (let v = 0; v < DV; v++) out[oo + v] = acc[v]! / sum
        lse[lo] = m + Math.log(sum)
      }
    }
  }
  return { out, lse }
}

/** The contract's bound on ||out - ref|| / ||ref||. */
export function tolerance(dtype: HalfDType): number {
  return dtype === 'bf16' ? 5e-3 : 1e-3
}

export function relL2(x: ArrayLike<number>, ref: ArrayLike<number>): number {
  let num = 0
  let den = 0
  for (let i = 0; i < ref.length; i++) {
    const d = x[i]! - ref[i]!
    num += d * d
    den += ref[i]! * ref[i]!
  }
  if (den === 0) return Math.sqrt(num)
  return Math.sqrt(num / den)
}

/** Asserts the contract's accuracy rules for one result; returns the rel-L2 error. */
export function checkAccuracy(
  t: ExecutionContext,
  label: string,
  dtype: HalfDType,
  out: Float32Array,
  lse: Float32Array,
  ref: Reference,
): number {
  t.is(out.length, ref.out.length, `${label}: out length`)
  t.is(lse.length, ref.lse.length, `${label}: lse length`)
  let bad = -1
  for (let i = 0; i < out.length; i++) {
    if (!Number.isFinite(out[i]!)) {
      bad = i
      break
    }
  }
  t.is(bad, -1, `${label}: out[${bad}] = ${out[bad]} is not finite`)
  const err = relL2(out, ref.out)
  t.true(err <= tolerance(dtype), `${label}: rel L2 error ${err.toExponential(3)} > ${tolerance(dtype)}`)
  const lseBad: string[] = []
  for (let i = 0; i < ref.lse.length; i++) {
    const r = ref.lse[i]!
    const x = lse[i]!
    if (r === Infinity) {
      if (x !== Infinity) lseBad.push(`lse[${i}] = ${x}, expected +Infinity`)
    } else if (!(Math.abs(x - r) <= 1e-5 * Math.max(Math.abs(r), 1))) {
      lseBad.push(`lse[${i}] = ${x}, expected ${r} (|err| ${Math.abs(x - r).toExponential(3)})`)
    }
  }
  t.deepEqual(lseBad.slice(0, 5), [], `${label}: ${lseBad.length} lse values out of tolerance`)
  return err
}

/**
 * The contract's cases, kept small (the f64 reference runs in JS): seqlens 1, 63, 64, 65,
 * 140 and 0 mixed in, h_q in {1, 3, 16, 64, 128}, s_q in {1, 2, 4} with causal, bf16 and
 * fp16. Each runs with both input distributions.
 */
export const CASES: CaseCfg[] = [
  { name: 'bf16 h16 s1', dtype: 'bf16', sQ: 1, hQ: 16, seqlens: [1, 63, 64, 65, 140, 0], causal: false },
  { name: 'fp16 h16 s1', dtype: 'fp16', sQ: 1, hQ: 16, seqlens: [140, 0, 65, 64, 63, 1], causal: false },
  { name: 'bf16 h1 s1', dtype: 'bf16', sQ: 1, hQ: 1, seqlens: [140, 0, 65, 1], causal: true },
  { name: 'fp16 h3 s2 causal', dtype: 'fp16', sQ: 2, hQ: 3, seqlens: [1, 2, 65, 0, 140], causal: true },
  { name: 'bf16 h3 s4 causal', dtype: 'bf16', sQ: 4, hQ: 3, seqlens: [3, 64, 0, 140, 1], causal: true },
  { name: 'bf16 h16 s2 causal', dtype: 'bf16', sQ: 2, hQ: 16, seqlens: [63, 1, 64, 65, 140], causal: true },
  { name: 'fp16 h64 s4 causal', dtype: 'fp16', sQ: 4, hQ: 64, seqlens: [63, 64, 2, 140], causal: true },
  { name: 'bf16 h64 s1', dtype: 'bf16', sQ: 1, hQ: 64, seqlens: [65, 0, 140], causal: false },
  { name: 'bf16 h128 s1', dtype: 'bf16', sQ: 1, hQ: 128, seqlens: [140, 64], causal: false },
  { name: 'fp16 h128 s2 causal', dtype: 'fp16', sQ: 2, hQ: 128, seqlens: [0, 65, 140], causal: true },
  { name: 'bf16 h16 s2 non-causal', dtype: 'bf16', sQ: 2, hQ: 16, seqlens: [1, 140], causal: false },
  { name: 'fp16 h16 s1 scale 0.1', dtype: 'fp16', sQ: 1, hQ: 16, seqlens: [140, 65], causal: false, softmaxScale: 0.1 },
  { name: 'bf16 all empty', dtype: 'bf16', sQ: 2, hQ: 16, seqlens: [0, 0], causal: true },
]

export const DISTS: Dist[] = ['scaled', 'plain']

/** A per-case seed derived from the run's base seed. */
export function caseSeed(index: number, dist: Dist): number {
  return (BASE_SEED + index * 7919 + (dist === 'plain' ? 104729 : 0)) >>> 0
}

// ---------------------------------------------------------------------------------------
// The plan scheduler (a port of mla_core::plan::host_plan) and a coverage check.

// The row layout and the split cost come from the binding (one source with the core's
// SchedMeta and the kernels' MlaSchedMeta).
const LAYOUT = native.schedMetaLayout()
export const META_INTS = LAYOUT.ints
const SPLIT_FIXED_COST = LAYOUT.splitFixedCost
function field(name: string): number {
  const f = LAYOUT.fields.find((x) => x.name === name)
  if (f === undefined) throw new Error(`schedMetaLayout(): no field '${name}' (fields: ${LAYOUT.fields.map((x) => x.name).join(', ')})`)
  return f.index
}
const BEGIN_SEQ = field('begin_seq')
const BEGIN_BLOCK = field('begin_block')
const END_SEQ = field('end_seq')
const END_BLOCK = field('end_block')
const BEGIN_SPLIT = field('begin_split')

export function hostPlan(seqlens: ArrayLike<number>, numParts: number): { meta: Int32Array; numSplits: Int32Array } {
  const b = seqlens.length
  const fixed = SPLIT_FIXED_COST
  const nb = Array.from(seqlens, (l) => Math.ceil(Math.max(0, l) / BLOCK_SIZE))
  const total = nb.reduce((a, n) => a + (n > 0 ? n + fixed : 0), 0)
  const payload = Math.max(1, Math.ceil(total / numParts)) + fixed
  const meta = new Int32Array(numParts * META_INTS)
  const numSplits = new Int32Array(b + 1)
  let seq = 0
  let blk = 0
  let splitsInSeq = 0
  for (let p = 0; p < numParts; p++) {
    const m = p * META_INTS
    meta[m + BEGIN_SEQ] = seq
    meta[m + BEGIN_BLOCK] = blk
    meta[m + BEGIN_SPLIT] = splitsInSeq
    let remain = payload
    while (seq < b) {
      const left = nb[seq]! - blk
      if (left > 0) {
        if (remain <= fixed) break
        const take = Math.min(left, remain - fixed)
        remain -= take + fixed
        blk += take
        splitsInSeq += 1
        if (blk < nb[seq]!) break
      }
      numSplits[seq + 1] = numSplits[seq]! + splitsInSeq
      seq += 1
      blk = 0
      splitsInSeq = 0
    }
    meta[m + END_SEQ] = seq
    meta[m + END_BLOCK] = blk
  }
  return { meta, numSplits }
}

/**
 * Checks that a plan assigns every block of every sequence to exactly one part, that the
 * split indices are consecutive, and that numSplits is the prefix sum of the splits.
 * Returns a list of problems (empty when the plan is valid).
 */
export function planProblems(seqlens: ArrayLike<number>, meta: Int32Array, numSplits: Int32Array, numParts: number): string[] {
  const b = seqlens.length
  const problems: string[] = []
  const seen = new Array<number>(b).fill(0)
  const segs = new Array<number>(b).fill(0)
  for (let p = 0; p < numParts; p++) {
    const m = p * META_INTS
    const [bs, bb, es, eb] = [meta[m + BEGIN_SEQ]!, meta[m + BEGIN_BLOCK]!, meta[m + END_SEQ]!, meta[m + END_BLOCK]!]
    for (let s = bs; s <= Math.min(es, b - 1); s++) {
      const nb = Math.ceil(seqlens[s]! / BLOCK_SIZE)
      const lo = s === bs ? bb : 0
      const hi = s === es ? eb : nb
      if (hi > lo) {
        const local = s === bs ? meta[m + BEGIN_SPLIT]! : 0
        if (local !== segs[s]) problems.push(`part ${p}: split index ${local} of seq ${s}, expected ${segs[s]}`)
        segs[s]! += 1
        seen[s]! += hi - lo
      }
    }
  }
  if (numSplits[0] !== 0) problems.push(`numSplits[0] = ${numSplits[0]}`)
  for (let s = 0; s < b; s++) {
    const nb = Math.ceil(seqlens[s]! / BLOCK_SIZE)
    if (seen[s] !== nb) problems.push(`seq ${s}: ${seen[s]} blocks assigned, expected ${nb}`)
    if (numSplits[s + 1]! - numSplits[s]! !== segs[s]) {
      problems.push(`seq ${s}: numSplits says ${numSplits[s + 1]! - numSplits[s]!} splits, the parts hold ${segs[s]}`)
    }
  }
  return problems
}
