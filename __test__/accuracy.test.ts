// CPU backend vs the float64 reference, on the contract's cases.

import test from 'ava'
import { Device, KvCache, decode } from '../index'
import { accuracyCases, checkCase } from './_accuracy'
import { BASE_SEED, D, Rng, checkAccuracy, fromBits, randomF32, referenceDecode, toBits, type CaseData } from './_helpers'

const cpu = Device.open('cpu')

for (const ac of accuracyCases()) {
  test(`cpu: ${ac.title}`, async (t) => {
    await checkCase(t, cpu, ac)
  })
}

test('cpu: decode reading a KvCache pool (appended in pieces, forked, permuted by frees) matches the reference', async (t) => {
  const rng = new Rng(BASE_SEED ^ 0x5eed)
  t.log(`seed base ${BASE_SEED}`)
  for (const dtype of ['bf16', 'fp16'] as const) {
    using cache = new KvCache(cpu, { numBlocks: 16, dtype })
    // Scatter the free list: create and free a few sequences first.
    const tmp = [cache.createSequence(), cache.createSequence()]
    cache.append(tmp[0]!, new Float32Array(70 * D))
    cache.append(tmp[1]!, new Float32Array(130 * D))
    cache.free(tmp[0]!)
    const a = cache.createSequence()
    const rowsA = toBits(randomF32(rng, 140 * D, 'scaled'), dtype)
    cache.append(a, rowsA.subarray(0, 30 * D))
    cache.append(a, fromBits(rowsA.subarray(30 * D, 100 * D), dtype)) // as f32, exact
    cache.append(a, rowsA.subarray(100 * D))
    cache.free(tmp[1]!)
    const b = cache.fork(a)
    const extra = toBits(randomF32(rng, 5 * D, 'scaled'), dtype)
    cache.append(b, extra) // copy-on-write of the shared last block
    const e = cache.createSequence() // empty
    const { blockTable, cacheSeqlens } = cache.batch([a, b, e])
    t.deepEqual([...cacheSeqlens.toInt32ArraySync()], [140, 145, 0])
    // The same data laid out by hand, for the reference.
    const pool = cache.tensor.toUint16ArraySync()
    const sQ = 2
    const hQ = 16
    const qBits = toBits(randomF32(rng, 3 * sQ * hQ * D, 'scaled'), dtype)
    const c: CaseData = {
      cfg: { name: 'cache', dtype, sQ, hQ, seqlens: [140, 145, 0], causal: true },
      dist: 'scaled',
      seed: 0,
      b: 3,
      numBlocks: 16,
      maxBlocksPerSeq: blockTable.shape[1]!,
      qBits,
      kvBits: pool,
      blockTable: blockTable.toInt32ArraySync(),
      seqlens: cacheSeqlens.toInt32ArraySync(),
    }
    // The pool really holds what was appended.
    const bt = c.blockTable
    const w = c.maxBlocksPerSeq
    const rowOf = (s: number, tok: number) =>
      pool.subarray((bt[s * w + (tok >> 6)]! * 64 + (tok & 63)) * D, (bt[s * w + (tok >> 6)]! * 64 + (tok & 63) + 1) * D)
    t.deepEqual(rowOf(0, 0), rowsA.subarray(0, D))
    t.deepEqual(rowOf(0, 139), rowsA.subarray(139 * D, 140 * D))
    t.deepEqual(rowOf(1, 139), rowsA.subarray(139 * D, 140 * D))
    t.deepEqual(rowOf(1, 144), extra.subarray(4 * D))
    const q = cpu.tensor(qBits, [3, sQ, hQ, D], dtype)
    const { out, lse } = await decode({ q, kvCache: cache, blockTable, cacheSeqlens, causal: true })
    checkAccuracy(t, `${dtype} cache`, dtype, await out.toFloat32Array(), await lse.toFloat32Array(), referenceDecode(c))
  }
})
