// Batch-invariant decoding (issue 11) through the TypeScript API: with
// `batchInvariant: true`, a sequence's out and lse bits do not depend on its batchmates,
// its position in the batch or where its blocks sit in the pool. On the CPU backend
// always; on CUDA when a GPU is usable (registered as skipped otherwise, with the reason;
// MLA_TEST_DEVICE=cuda makes them run and fail without one).

import { inspect } from 'node:util'
import test, { type ExecutionContext } from 'ava'
import { Device, decode, decodeInto, decodeSync, gpuStatus, type HalfDType, type Plan } from '../index'
import { BASE_SEED, D, DV, GARBAGE, Rng, checkAccuracy, expectCode, randomF32, referenceDecode, toBits, type CaseData } from './_helpers'

const BS = 64
const status = gpuStatus()
const gpuEnabled = status.available || process.env.MLA_TEST_DEVICE === 'cuda'
let gpuDevice: Device | undefined

/** Registers a test on the CPU backend and on CUDA (visibly skipped without a GPU). */
function both(title: string, fn: (t: ExecutionContext, dev: Device) => Promise<void>): void {
  test(`cpu: ${title}`, async (t) => fn(t, Device.open('cpu')))
  if (!gpuEnabled) {
    test.skip(`no GPU: ${status.reason ?? 'unknown'} | gpu: ${title}`, () => undefined)
    return
  }
  test.serial(`gpu: ${title}`, async (t) => fn(t, (gpuDevice ??= Device.open('cuda'))))
}

interface Seq {
  len: number
  /** [sQ, hQ, 576] bits. */
  q: Uint16Array
  /** len cache rows [len, 576] bits. */
  rows: Uint16Array
}

function targetSeq(rng: Rng, len: number, sQ: number, hQ: number, dtype: HalfDType): Seq {
  return { len, q: toBits(randomF32(rng, sQ * hQ * D, 'scaled'), dtype), rows: toBits(randomF32(rng, len * D, 'plain'), dtype) }
}

/** A batchmate: values from a small table of random bits (cheap; only the target is checked). */
function mateSeq(rng: Rng, pool: Uint16Array, len: number, sQ: number, hQ: number): Seq {
  const draw = (n: number) => {
    const a = new Uint16Array(n)
    let k = rng.int(pool.length)
    for (let i = 0; i < n; i++) a[i] = pool[(k = (k * 1103515245 + 12345) & 4095)]!
    return a
  }
  return { len, q: draw(sQ * hQ * D), rows: draw(len * D) }
}

/**
 * A batch of `seqs`: blocks in a shuffled pool with spare blocks, every row no sequence
 * reads (the rest of a last block, spare blocks) NaN or +-Inf, table tails garbage.
 */
function batchOf(rng: Rng, seqs: Seq[], sQ: number, hQ: number, dtype: HalfDType): CaseData {
  const b = seqs.length
  const nb = seqs.map((s) => Math.ceil(s.len / BS))
  const numBlocks = nb.reduce((a, x) => a + x, 0) + 1 + rng.int(4)
  const maxBlocksPerSeq = Math.max(1, ...nb) + 1 + rng.int(2)
  const perm = rng.shuffle([...Array(numBlocks).keys()])
  const poison = dtype === 'bf16' ? [0x7fc0, 0x7f80, 0xff80] : [0x7e00, 0x7c00, 0xfc00]
  const kvBits = new Uint16Array(numBlocks * BS * D)
  for (let r = 0; r < numBlocks * BS; r++) kvBits.fill(poison[rng.int(3)]!, r * D, (r + 1) * D)
  const blockTable = new Int32Array(b * maxBlocksPerSeq).fill(GARBAGE)
  let next = 0
  seqs.forEach((s, i) => {
    for (let j = 0; j < nb[i]!; j++) {
      const blk = perm[next++]!
      blockTable[i * maxBlocksPerSeq + j] = blk
      const n = Math.min(BS, s.len - j * BS)
      kvBits.set(s.rows.subarray(j * BS * D, (j * BS + n) * D), blk * BS * D)
    }
  })
  const qBits = new Uint16Array(b * sQ * hQ * D)
  seqs.forEach((s, i) => qBits.set(s.q, i * sQ * hQ * D))
  const causal = sQ > 1
  return {
    cfg: { name: 'invariance', dtype, sQ, hQ, seqlens: seqs.map((s) => s.len), causal },
    dist: 'scaled',
    seed: BASE_SEED,
    b,
    numBlocks,
    maxBlocksPerSeq,
    qBits,
    kvBits,
    blockTable,
    seqlens: Int32Array.from(seqs.map((s) => s.len)),
  }
}

/** Decodes `c` on `dev` into outputs poisoned first (0xFF bytes: NaN): sequence `pos`'s out bits and lse bits. */
async function seqBits(
  dev: Device,
  c: CaseData,
  pos: number,
  batchInvariant: boolean,
): Promise<{ out: Uint16Array; lse: Uint32Array; plan: Plan }> {
  const { sQ, hQ, dtype, causal } = c.cfg
  const q = dev.tensor(c.qBits, [c.b, sQ, hQ, D], dtype)
  const kvCache = dev.tensor(c.kvBits, [c.numBlocks, BS, 1, D], dtype)
  const blockTable = dev.tensor(c.blockTable, [c.b, c.maxBlocksPerSeq])
  const cacheSeqlens = dev.tensor(c.seqlens, [c.b])
  const plan = dev.plan(cacheSeqlens, { sQ, hQ, batchInvariant })
  const o = dev.zeros([c.b, sQ, hQ, DV], dtype)
  const l = dev.zeros([c.b, hQ, sQ], 'fp32')
  o.fill(0xff)
  l.fill(0xff)
  decodeInto({ q, kvCache, blockTable, cacheSeqlens, plan, causal, batchInvariant }, { out: o, lse: l })
  await dev.synchronize()
  const rows = sQ * hQ
  const out = (await o.toUint16Array()).slice(pos * rows * DV, (pos + 1) * rows * DV)
  const lse = new Uint32Array((await l.toFloat32Array()).slice(pos * rows, (pos + 1) * rows).buffer)
  for (const x of [q, kvCache, blockTable, cacheSeqlens, o, l]) x.dispose()
  return { out, lse, plan }
}

function differing(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let n = 0
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) n++
  return n
}

for (const [hQ, sQ] of [
  [16, 1],
  [16, 2],
  [128, 1],
  [128, 2],
] as const) {
  both(
    `batch-invariant plan: a sequence alone and beside 1, 4, 16, 40 mates (random lengths, positions, block placement), hQ ${hQ} sQ ${sQ}: 0 differing bits`,
    async (t, dev) => {
      const seed = (BASE_SEED ^ (hQ * 31 + sQ)) >>> 0
      t.log(`seed ${seed} (MLA_TEST_SEED replays the base seed ${BASE_SEED})`)
      const rng = new Rng(seed)
      const dtype: HalfDType = 'bf16'
      const table = toBits(
        Float32Array.from({ length: 4096 }, () => rng.next() - 0.5),
        dtype,
      )
      // 2 chunks of the standard rule (64 blocks = 4096 tokens each at most).
      const len = 4200 + rng.int(3000)
      const target = targetSeq(rng, len, sQ, hQ, dtype)
      const aloneCase = batchOf(rng, [target], sQ, hQ, dtype)
      const alone = await seqBits(dev, aloneCase, 0, true)
      t.true(alone.plan.batchInvariant)
      // The alone result is right (so that equal garbage cannot pass).
      const ref = referenceDecode(aloneCase)
      const outF32 = new Float32Array(new Uint32Array(Array.from(alone.out, (x) => x << 16)).buffer)
      checkAccuracy(t, `alone, len ${len}`, dtype, outF32, new Float32Array(alone.lse.buffer), ref)
      for (const mates of [1, 4, 16, 40]) {
        const others = Array.from({ length: mates }, () => mateSeq(rng, table, rng.int(8) === 0 ? 0 : rng.int(3000), sQ, hQ))
        const pos = rng.int(mates + 1)
        const seqs = [...others.slice(0, pos), target, ...others.slice(pos)]
        const c = batchOf(rng, seqs, sQ, hQ, dtype)
        const got = await seqBits(dev, c, pos, true)
        const what = `len ${len} at ${pos} of [${seqs.map((s) => s.len).join(', ')}]`
        t.is(differing(got.out, alone.out), 0, `${what}: out elements differ from the sequence alone`)
        t.is(differing(got.lse, alone.lse), 0, `${what}: lse elements differ from the sequence alone`)
        got.plan.dispose()
      }
      alone.plan.dispose()
    },
  )
}

both(
  'batchInvariant: decode without a plan, Plan.update keeps it, numSplits from the own length, refused with a default plan',
  async (t, dev) => {
    const rng = new Rng(BASE_SEED ^ 0x1a7)
    const dtype: HalfDType = 'bf16'
    const lens = [10000, 0, 64, 4097, 40000]
    const c = batchOf(
      rng,
      lens.map((l) => targetSeq(rng, l, 1, 16, dtype)),
      1,
      16,
      dtype,
    )
    const q = dev.tensor(c.qBits, [c.b, 1, 16, D], dtype)
    const kvCache = dev.tensor(c.kvBits, [c.numBlocks, BS, 1, D], dtype)
    const blockTable = dev.tensor(c.blockTable, [c.b, c.maxBlocksPerSeq])
    const cacheSeqlens = dev.tensor(c.seqlens, [c.b])
    // Without a plan: the same bits as with an explicit invariant plan.
    const explicit = await seqBits(dev, c, 4, true)
    const auto = decodeSync({ q, kvCache, blockTable, cacheSeqlens, batchInvariant: true })
    t.is(differing((await auto.out.toUint16Array()).slice(4 * 16 * DV), explicit.out), 0)
    // Chunks per sequence: min(8, ceil(blocks / 64)), whatever the batch.
    const plan = dev.plan(cacheSeqlens, { hQ: 16, batchInvariant: true })
    t.true(plan.batchInvariant)
    // blocks 157, 0, 1, 65, 625 -> chunks 3, 0, 1, 2, 8
    t.deepEqual([...(await plan.numSplits.toInt32Array())], [0, 3, 3, 4, 6, 14])
    const grown = dev.tensor(Int32Array.from([64, 0, 1, 12289, 1]), [5])
    plan.update(grown)
    t.true(plan.batchInvariant)
    // blocks 1, 0, 1, 193, 1 -> chunks 1, 0, 1, 4, 1
    t.deepEqual([...(await plan.numSplits.toInt32Array())], [0, 1, 1, 2, 6, 7])
    t.regex(inspect(plan), /batchInvariant: true/)
    // A default plan where invariance is asked for; a non-boolean option.
    const dflt = dev.plan(cacheSeqlens, { hQ: 16 })
    t.false(dflt.batchInvariant)
    await expectCode(
      t,
      () => decode({ q, kvCache, blockTable, cacheSeqlens, plan: dflt, batchInvariant: true }),
      'ERR_INVALID_ARGUMENT',
      'batch-invariant',
    )
    t.throws(() => dev.plan(cacheSeqlens, { hQ: 16, batchInvariant: 'yes' as unknown as boolean }), {
      message: /batchInvariant: expected a boolean/,
    })
    await expectCode(
      t,
      () => decode({ q, kvCache, blockTable, cacheSeqlens, batchInvariant: 1 as unknown as boolean }),
      'ERR_INVALID_ARGUMENT',
      'batchInvariant',
    )
    for (const x of [q, kvCache, blockTable, cacheSeqlens, grown, auto.out, auto.lse]) x.dispose()
    for (const p of [plan, dflt, explicit.plan]) p.dispose()
  },
)
