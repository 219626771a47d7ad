// The serving path through the TypeScript API: enqueued steps and their errors
// (decodeInto, waitStep, synchronize), caller-owned outputs, in-place re-planning, batched
// cache appends, captured steps, a soak test.
//
// Every test runs on the CPU backend, and on CUDA when a GPU is usable; without one the GPU
// variants are registered as skipped with the reason in their title. MLA_TEST_DEVICE=cuda
// makes them run (and fail) anyway. Serial: the CPU backend's step log is one per process.

import test, { type ExecutionContext } from 'ava'
import {
  Device,
  KvCache,
  MlaError,
  Tensor,
  _setAwaitSpinUs,
  _whenDone,
  captureStep,
  decode,
  decodeInto,
  decodeSync,
  gpuStatus,
  type ErrorCode,
} from '../index'
import { BASE_SEED, D, Rng, caseTensors, checkAccuracy, makeCase, randomF32, referenceDecode, toBits, type CaseData } from './_helpers'

const status = gpuStatus()
const forced = process.env.MLA_TEST_DEVICE === 'cuda'
const gpuEnabled = status.available || forced
const cpu = Device.open('cpu')
let cuda: Device | undefined

/** Registers `title` on the CPU backend and on CUDA (visibly skipped without a GPU). */
function both(title: string, fn: (t: ExecutionContext, dev: Device) => Promise<void> | void): void {
  test.serial(`cpu: ${title}`, async (t) => {
    await cpu.synchronize().catch(() => undefined) // nothing of an earlier test lingers
    await fn(t, cpu)
  })
  if (!gpuEnabled) {
    test.skip(`no GPU: ${status.reason ?? 'unknown'} | gpu: ${title}`, () => undefined)
    return
  }
  test.serial(`gpu: ${title}`, async (t) => {
    cuda ??= Device.open((process.env.MLA_TEST_CUDA_DEVICE ?? 'cuda') as 'cuda')
    await cuda.synchronize().catch(() => undefined)
    await fn(t, cuda)
  })
}

/** The error `f` throws or rejects with (fails the test when there is none). */
async function caught(t: ExecutionContext, f: () => unknown, code: ErrorCode): Promise<MlaError | undefined> {
  try {
    await f()
  } catch (e) {
    t.true(e instanceof MlaError, String(e))
    t.is((e as MlaError).code, code, (e as Error).message)
    return e as MlaError
  }
  t.fail(`expected ${code}, got no error`)
  return undefined
}

function poisoned(dev: Device, c: CaseData): { out: Tensor; lse: Tensor } {
  const out = dev.zeros([c.b, c.cfg.sQ, c.cfg.hQ, 512], c.cfg.dtype)
  const lse = dev.zeros([c.b, c.cfg.hQ, c.cfg.sQ], 'fp32')
  out.fill(0xff)
  lse.fill(0xff)
  return { out, lse }
}

/** A block table like the case's where block 1 of sequence 1 (read) is `bad`. */
function badTable(dev: Device, c: CaseData, bad: number): Tensor {
  const bt = Int32Array.from(c.blockTable)
  bt[c.maxBlocksPerSeq + 1] = bad
  return dev.tensor(bt, [c.b, c.maxBlocksPerSeq])
}

let seedStep = 0
function servingCase(seqlens: number[], hQ = 16, sQ = 2): CaseData {
  return makeCase(
    { name: 'serve', dtype: 'bf16', sQ, hQ, seqlens, causal: true },
    seedStep % 2 ? 'plain' : 'scaled',
    (BASE_SEED + 7717 * ++seedStep) >>> 0,
  )
}

async function expectExact(t: ExecutionContext, label: string, c: CaseData, o: { out: Tensor; lse: Tensor }): Promise<void> {
  checkAccuracy(t, label, c.cfg.dtype, await o.out.toFloat32Array(), await o.lse.toFloat32Array(), referenceDecode(c))
}

both('a bad block index in an enqueued step is reported by the next sync, naming that step; later steps are exact', async (t, dev) => {
  const c = servingCase([100, 200, 1, 65])
  t.log(`case seed ${c.seed}; MLA_TEST_SEED=${BASE_SEED} replays the run`)
  const args = caseTensors(dev, c)
  const plan = dev.plan(args.cacheSeqlens, { sQ: 2, hQ: 16 })
  for (const bad of [c.numBlocks, -1, 2147480000]) {
    const a = poisoned(dev, c)
    const b = poisoned(dev, c)
    const d = poisoned(dev, c)
    const sa = decodeInto({ ...args, plan, causal: true, label: 'layer 0' }, a)
    const sb = decodeInto({ ...args, blockTable: badTable(dev, c, bad), plan, causal: true, label: 'layer 1' }, b)
    const sd = decodeInto({ ...args, plan, causal: true, label: 'layer 2' }, d)
    t.true(sa < sb && sb < sd, `step ids increase: ${sa} ${sb} ${sd}`)
    const e = await caught(t, () => dev.synchronize(), 'ERR_BLOCK_INDEX')
    t.is(e?.step, sb)
    t.is(e?.stepLabel, 'layer 1')
    t.true(e?.message.startsWith(`step ${sb} (layer 1): block_table`), e?.message)
    await t.notThrowsAsync(dev.synchronize(), 'reported once')
    await expectExact(t, 'the step before the bad one', c, a)
    await expectExact(t, 'the step after the bad one', c, d)
  }
})

both("waitStep reports its own step's error; synchronizeSync the others", async (t, dev) => {
  const c = servingCase([70, 300, 5])
  const args = caseTensors(dev, c)
  const plan = dev.plan(args.cacheSeqlens, { sQ: 2, hQ: 16 })
  const b1 = poisoned(dev, c)
  const b2 = poisoned(dev, c)
  const g = poisoned(dev, c)
  const s1 = decodeInto({ ...args, blockTable: badTable(dev, c, c.numBlocks + 3), plan, causal: true, label: 'first' }, b1)
  const s2 = decodeInto({ ...args, blockTable: badTable(dev, c, -9), plan, causal: true, label: 'second' }, b2)
  const sg = decodeInto({ ...args, plan, causal: true }, g)
  await t.notThrowsAsync(dev.waitStep(sg))
  const e2 = await caught(t, () => dev.waitStep(s2), 'ERR_BLOCK_INDEX')
  t.is(e2?.step, s2)
  const e1 = await caught(t, () => dev.synchronizeSync(), 'ERR_BLOCK_INDEX')
  t.is(e1?.step, s1)
  t.is(e1?.stepLabel, 'first')
  t.notThrows(() => dev.waitStepSync(s1), 'reported once')
  await expectExact(t, 'good step', c, g)
  await caught(t, () => dev.waitStep(0), 'ERR_INVALID_ARGUMENT')
  await caught(t, () => dev.waitStep(1.5), 'ERR_INVALID_ARGUMENT')
  await caught(t, () => dev.waitStep(sg + 1e9), 'ERR_INVALID_ARGUMENT')
})

both('reading a tensor is a synchronising call: it reports the failed step, then reads', async (t, dev) => {
  const c = servingCase([1, 129])
  const args = caseTensors(dev, c)
  const plan = dev.plan(args.cacheSeqlens, { sQ: 2, hQ: 16 })
  const b = poisoned(dev, c)
  const g = poisoned(dev, c)
  const sb = decodeInto({ ...args, blockTable: badTable(dev, c, -3), plan, causal: true, label: 'bad' }, b)
  decodeInto({ ...args, plan, causal: true }, g)
  const e = await caught(t, () => g.out.toFloat32Array(), 'ERR_BLOCK_INDEX')
  t.is(e?.step, sb)
  await expectExact(t, 'read after the report', c, g)
})

both('decode and decodeSync report their own step; results carry the step id', async (t, dev) => {
  const c = servingCase([64, 65])
  const args = caseTensors(dev, c)
  const r = await decode({ ...args, causal: true })
  const s = decodeSync({ ...args, causal: true })
  t.true(Number.isInteger(r.step) && r.step > 0)
  t.true(s.step > r.step)
  await expectExact(t, 'decode', c, r)
  await expectExact(t, 'decodeSync', c, s)
  const e = await caught(t, () => decode({ ...args, blockTable: badTable(dev, c, 99), causal: true, label: 'mine' }), 'ERR_BLOCK_INDEX')
  t.is(e?.stepLabel, 'mine')
  await t.notThrowsAsync(dev.synchronize(), 'the promise reported it')
})

both("decodeInto writes into the caller's tensors, allocating nothing", async (t, dev) => {
  const c = servingCase([33, 140, 0, 64], 64, 1)
  const args = caseTensors(dev, c)
  const plan = dev.plan(args.cacheSeqlens, { sQ: 1, hQ: 64 })
  const o = poisoned(dev, c)
  const ptr = o.out.devicePtr
  decodeInto({ ...args, plan, causal: true }, o)
  await dev.synchronize()
  const before = dev.memoryStats()
  for (let i = 0; i < 20; i++) decodeInto({ ...args, plan, causal: true }, o)
  await dev.synchronize()
  // Garbage collection may free tensors of earlier tests meanwhile: nothing may grow.
  const after = dev.memoryStats()
  t.true(after.hostTensorBytes <= before.hostTensorBytes, `host tensor bytes ${before.hostTensorBytes} -> ${after.hostTensorBytes}`)
  t.true(after.deviceLiveBuffers <= before.deviceLiveBuffers, `device buffers ${before.deviceLiveBuffers} -> ${after.deviceLiveBuffers}`)
  t.is(o.out.devicePtr, ptr)
  t.is(o.out.storage, 'owned')
  await expectExact(t, 'decodeInto', c, o)
})

both('decodeInto argument rules: distinct outputs of their own, right shapes', async (t, dev) => {
  const c = servingCase([10, 80])
  const args = caseTensors(dev, c)
  const plan = dev.plan(args.cacheSeqlens, { sQ: 2, hQ: 16 })
  const o = poisoned(dev, c)
  await caught(t, () => decodeInto({ ...args, plan }, { out: o.out, lse: o.out }), 'ERR_INVALID_ARGUMENT')
  await caught(t, () => decodeInto({ ...args, plan }, { out: args.q, lse: o.lse }), 'ERR_INVALID_ARGUMENT')
  await caught(t, () => decodeInto({ ...args, plan }, { out: dev.zeros([c.b, 2, 16, 511], 'bf16'), lse: o.lse }), 'ERR_SHAPE')
  await caught(t, () => decodeInto({ ...args, plan }, { out: o.out, lse: dev.zeros([c.b, 16, 2], 'bf16') }), 'ERR_DTYPE')
  await caught(t, () => decodeInto({ ...args, plan }, { out: plan.numSplits, lse: o.lse }), 'ERR_UNSUPPORTED')
  await caught(t, () => decodeInto({ ...args, plan }, undefined as unknown as { out: Tensor; lse: Tensor }), 'ERR_INVALID_ARGUMENT')
  await caught(t, () => decodeInto({ ...args, plan: dev.plan(args.cacheSeqlens, { hQ: 16 }) }, o), 'ERR_INVALID_ARGUMENT')
  // A pending read holds the tensor: it cannot be written meanwhile.
  const pending = o.out.toFloat32Array()
  await caught(t, () => decodeInto({ ...args, plan }, o), 'ERR_INVALID_ARGUMENT')
  await pending
  t.notThrows(() => decodeInto({ ...args, plan }, o))
  await dev.synchronize()
})

both('tensor.write and copyFrom overwrite in place', async (t, dev) => {
  const x = dev.zeros([3, D], 'bf16')
  const v = new Float32Array(3 * D).map((_, i) => (i % 17) - 8)
  x.write(v)
  t.deepEqual(await x.toFloat32Array(), v)
  const y = dev.zeros([3, D], 'bf16')
  y.copyFrom(x)
  t.deepEqual(await y.toFloat32Array(), v)
  const i = dev.zeros([4], 'int32')
  i.write(new Int32Array([5, -1, 7, 2 ** 31 - 1]))
  t.deepEqual([...(await i.toInt32Array())], [5, -1, 7, 2 ** 31 - 1])
  await caught(t, () => x.write(new Float32Array(5)), 'ERR_SHAPE')
  await caught(t, () => i.write(new Float32Array(4)), 'ERR_DTYPE')
  await caught(t, () => y.copyFrom(i), 'ERR_SHAPE')
  await caught(t, () => y.copyFrom(y), 'ERR_INVALID_ARGUMENT')
})

both('plan.update re-plans in place: equals a fresh plan, decodes exactly, allocates nothing', async (t, dev) => {
  const maxLen = 2000
  const base = servingCase(
    Array.from({ length: 5 }, (_, i) => maxLen - 300 * i),
    16,
    1,
  )
  const args = caseTensors(dev, base)
  const plan = dev.plan(args.cacheSeqlens, { hQ: 16 })
  const meta = plan.tileSchedulerMetadata
  const ptr = meta.devicePtr
  const o = poisoned(dev, base)
  const rng = new Rng(base.seed)
  const sets = [[0, 0, 0, 0, 0], Array.from(base.seqlens, (l) => Math.max(0, l - 1)), Array.from({ length: 5 }, () => rng.int(maxLen + 1))]
  for (const lens of sets) {
    await dev.synchronize()
    const before = dev.memoryStats()
    // Shorter lengths of the same cache: the reference is the case with those lengths.
    const lensNow: number[] = lens.map((l, i) => Math.min(l, base.seqlens[i]!))
    args.cacheSeqlens.write(Int32Array.from(lensNow))
    const id = plan.update(args.cacheSeqlens)
    t.true(id > 0)
    o.out.fill(0xff)
    o.lse.fill(0xff)
    decodeInto({ ...args, plan, causal: true }, o)
    await dev.synchronize()
    // Garbage collection may free tensors of earlier tests meanwhile: nothing may grow.
    const after = dev.memoryStats()
    t.true(after.hostTensorBytes <= before.hostTensorBytes, `host tensor bytes ${before.hostTensorBytes} -> ${after.hostTensorBytes}`)
    t.true(after.deviceLiveBuffers <= before.deviceLiveBuffers, `device buffers ${before.deviceLiveBuffers} -> ${after.deviceLiveBuffers}`)
    const fresh = dev.plan(args.cacheSeqlens, { hQ: 16 })
    t.deepEqual([...(await plan.tileSchedulerMetadata.toInt32Array())], [...(await fresh.tileSchedulerMetadata.toInt32Array())])
    t.deepEqual([...(await plan.numSplits.toInt32Array())], [...(await fresh.numSplits.toInt32Array())])
    t.deepEqual(
      [...(await meta.toInt32Array())],
      [...(await fresh.tileSchedulerMetadata.toInt32Array())],
      'an earlier view sees the update',
    )
    t.is(meta.devicePtr, ptr)
    fresh.dispose()
    const c = { ...base, seqlens: Int32Array.from(lensNow), cfg: { ...base.cfg, seqlens: lensNow } }
    await expectExact(t, `after update to ${lensNow}`, c, o)
  }
  await caught(t, () => plan.update(dev.tensor(new Int32Array([1, 2]), [2])), 'ERR_SHAPE')
  await caught(t, () => plan.update(plan.numSplits), 'ERR_INVALID_ARGUMENT')
})

both('appendBatch equals one append per sequence (bits, f32, a device tensor), forks included', async (t, dev) => {
  const rng = new Rng(BASE_SEED ^ 0xba7c)
  for (const dtype of ['bf16', 'fp16'] as const) {
    const caches = [0, 1, 2, 3].map(() => new KvCache(dev, { numBlocks: 64, dtype }))
    let seqs: number[] = []
    for (const len of [0, 1, 63, 64, 65, 130]) {
      const rows = toBits(randomF32(rng, len * D, 'scaled'), dtype)
      const ids = caches.map((c) => {
        const s = c.createSequence()
        c.append(s, rows)
        return s
      })
      seqs.push(ids[0]!)
      if (len % 2 === 1) seqs.push(caches.map((c) => c.fork(ids[0]!))[0]!)
    }
    for (let round = 0; round < 5; round++) {
      const n = 1 + rng.int(3)
      const pick = rng.shuffle(seqs.filter(() => rng.next() < 0.75))
      if (pick.length === 0) continue
      const f32 = randomF32(rng, pick.length * n * D, 'scaled')
      const bits = toBits(f32, dtype)
      const ids = [
        caches[0]!.appendBatch(pick, bits),
        caches[2]!.appendBatch(pick, f32),
        caches[3]!.appendBatch(pick, dev.tensor(bits, [pick.length, n, D], dtype)),
      ]
      t.true(ids.every((id) => Number.isInteger(id) && id > 0))
      pick.forEach((s, i) => caches[1]!.append(s, bits.subarray(i * n * D, (i + 1) * n * D)))
      const pools = await Promise.all(caches.map((c) => c.tensor.toUint16Array()))
      for (let k = 1; k < 4; k++) {
        t.is(caches[k]!.freeBlocks, caches[0]!.freeBlocks, `${dtype} round ${round}: free blocks of cache ${k}`)
        for (const s of seqs) {
          t.is(caches[k]!.seqLen(s), caches[0]!.seqLen(s))
          t.deepEqual(caches[k]!.blockIds(s), caches[0]!.blockIds(s))
        }
        t.true(Buffer.from(pools[k]!.buffer).equals(Buffer.from(pools[0]!.buffer)), `${dtype} round ${round}: pool of cache ${k} differs`)
      }
      // The last appended token of each picked sequence is its last row.
      pick.forEach((s, i) => {
        const len = caches[0]!.seqLen(s)
        const blk = caches[0]!.blockIds(s)[Math.floor((len - 1) / 64)]!
        const at = (blk * 64 + ((len - 1) % 64)) * D
        t.deepEqual(pools[0]!.subarray(at, at + D), bits.subarray((i * n + n - 1) * D, (i * n + n) * D))
      })
    }
    seqs = []
    caches.forEach((c) => c.dispose())
  }
})

both('appendBatch is all or nothing; bad batches are typed errors', async (t, dev) => {
  const rng = new Rng(BASE_SEED ^ 0xa11)
  using cache = new KvCache(dev, { numBlocks: 4, dtype: 'bf16' })
  const a = cache.createSequence()
  const b = cache.createSequence()
  cache.append(a, randomF32(rng, 60 * D, 'scaled'))
  const before = { pool: await cache.tensor.toUint16Array(), free: cache.freeBlocks, lenA: cache.seqLen(a), ids: cache.blockIds(a) }
  await caught(t, () => cache.appendBatch([a, b], randomF32(rng, 2 * 100 * D, 'scaled')), 'ERR_CACHE_EXHAUSTED')
  await caught(t, () => cache.appendBatch([a, a], new Float32Array(2 * D)), 'ERR_INVALID_ARGUMENT')
  await caught(t, () => cache.appendBatch([a, 12345], new Float32Array(2 * D)), 'ERR_UNKNOWN_SEQUENCE')
  await caught(t, () => cache.appendBatch([a, b], new Float32Array(D)), 'ERR_SHAPE')
  await caught(t, () => cache.appendBatch([a], new Float32Array(D + 1)), 'ERR_SHAPE')
  await caught(t, () => cache.appendBatch([a, b], dev.tensor(new Float32Array(2 * D), [2, D], 'fp16')), 'ERR_DTYPE')
  await caught(t, () => cache.appendBatch([a, b], dev.tensor(new Float32Array(2 * D), [2 * D], 'bf16')), 'ERR_SHAPE')
  await caught(t, () => cache.appendBatch([a, b], cache.tensor), 'ERR_INVALID_ARGUMENT')
  await caught(t, () => cache.appendBatch([1.5], new Float32Array(D)), 'ERR_INVALID_ARGUMENT')
  t.deepEqual(await cache.tensor.toUint16Array(), before.pool)
  t.is(cache.freeBlocks, before.free)
  t.is(cache.seqLen(a), before.lenA)
  t.deepEqual(cache.blockIds(a), before.ids)
  t.is(cache.seqLen(b), 0)
})

both('batchInto writes what batch returns, in place', async (t, dev) => {
  const rng = new Rng(BASE_SEED ^ 0xb17)
  using cache = new KvCache(dev, { numBlocks: 32, dtype: 'bf16' })
  const seqs = [0, 1, 2, 3].map(() => cache.createSequence())
  const bt = dev.zeros([4, 6], 'int32')
  const sl = dev.zeros([4], 'int32')
  const ptr = bt.devicePtr
  for (let round = 0; round < 4; round++) {
    cache.appendBatch(seqs, randomF32(rng, 4 * (1 + rng.int(60)) * D, 'scaled'))
    const want = cache.batch(seqs, 6)
    cache.batchInto(seqs, bt, sl)
    t.deepEqual([...(await bt.toInt32Array())], [...(await want.blockTable.toInt32Array())])
    t.deepEqual([...(await sl.toInt32Array())], [...(await want.cacheSeqlens.toInt32Array())])
    t.is(bt.devicePtr, ptr)
  }
  await caught(t, () => cache.batchInto(seqs, dev.zeros([3, 6], 'int32'), sl), 'ERR_SHAPE')
  await caught(t, () => cache.batchInto(seqs, bt, dev.zeros([4], 'fp32')), 'ERR_DTYPE')
  await caught(t, () => cache.batchInto(seqs, bt, bt), 'ERR_INVALID_ARGUMENT')
})

both('captureStep: replays with new lengths equal eager decodes bit for bit (3 layers, own pools)', async (t, dev) => {
  const rng = new Rng(BASE_SEED ^ 0x9a4)
  const [b, hQ, sQ, layers] = [3, 16, 2, 3]
  const caches = Array.from({ length: layers }, () => new KvCache(dev, { numBlocks: 32, dtype: 'bf16' }))
  const seqs = [0, 1, 2].map(() => caches.map((c) => c.createSequence())[0]!)
  const start = [1, 63, 129]
  seqs.forEach((s, i) => caches.forEach((c) => c.append(s, randomF32(rng, start[i]! * D, 'scaled'))))
  using step = captureStep(dev, { kvCaches: caches, batch: b, maxBlocksPerSeq: 6, sQ, hQ, causal: true, label: 'tok' })
  t.is(step.layers, layers)
  t.is(step.isGraph, dev.kind === 'cuda')
  t.is(step.q(0).storage, 'step')
  for (let round = 0; round < 4; round++) {
    caches.forEach((c) => c.appendBatch(seqs, randomF32(rng, b * (1 + (round % 2)) * D, 'scaled')))
    step.setBatch(caches[0]!, seqs)
    const qs = Array.from({ length: layers }, () => toBits(randomF32(rng, b * sQ * hQ * D, 'scaled'), 'bf16'))
    qs.forEach((q, l) => step.q(l).write(q))
    step.out(1).fill(0xff)
    const id = step.replay()
    await dev.waitStep(id)
    const { blockTable, cacheSeqlens } = caches[0]!.batch(seqs, 6)
    t.deepEqual([...(await step.cacheSeqlens.toInt32Array())], [...(await cacheSeqlens.toInt32Array())])
    for (let l = 0; l < layers; l++) {
      const q = dev.tensor(qs[l]!, [b, sQ, hQ, D], 'bf16')
      const r = await decode({ q, kvCache: caches[l]!, blockTable, cacheSeqlens, causal: true })
      t.deepEqual(await step.out(l).toUint16Array(), await r.out.toUint16Array(), `round ${round} layer ${l}: out`)
      t.deepEqual(await step.lse(l).toFloat32Array(), await r.lse.toFloat32Array(), `round ${round} layer ${l}: lse`)
    }
  }
  caches.forEach((c) => c.dispose())
})

both("a captured step's bad replay is reported by the next sync, naming it; the next replay is exact", async (t, dev) => {
  const rng = new Rng(BASE_SEED ^ 0xbad)
  using cache = new KvCache(dev, { numBlocks: 8, dtype: 'bf16' })
  const seqs = [cache.createSequence(), cache.createSequence()]
  cache.append(seqs[0]!, randomF32(rng, 100 * D, 'scaled'))
  cache.append(seqs[1]!, randomF32(rng, 150 * D, 'scaled'))
  using step = dev.captureStep({ kvCaches: [cache], batch: 2, maxBlocksPerSeq: 4, hQ: 16 })
  step.q(0).write(randomF32(rng, 2 * 16 * D, 'scaled'))
  step.setBatch(cache, seqs)
  const bt = await step.blockTable.toInt32Array()
  bt[4 + 1] = 8 // block 1 of sequence 1: outside the 8-block pool
  step.blockTable.write(bt)
  const bad = step.replay()
  const e = await caught(t, () => dev.synchronize(), 'ERR_BLOCK_INDEX')
  t.is(e?.step, bad)
  t.is(e?.stepLabel, 'graph step')
  step.setBatch(cache, seqs)
  const good = step.replay()
  await t.notThrowsAsync(dev.waitStep(good))
  const { blockTable, cacheSeqlens } = cache.batch(seqs, 4)
  const r = await decode({ q: step.q(0), kvCache: cache, blockTable, cacheSeqlens })
  t.deepEqual(await step.out(0).toUint16Array(), await r.out.toUint16Array())
  await caught(t, () => dev.captureStep({ kvCaches: [], batch: 2, maxBlocksPerSeq: 4, hQ: 16 }), 'ERR_INVALID_ARGUMENT')
  await caught(t, () => dev.captureStep({ kvCaches: [cache], batch: 0, maxBlocksPerSeq: 4, hQ: 16 }), 'ERR_INVALID_ARGUMENT')
  await caught(t, () => dev.captureStep({ kvCaches: [cache], batch: 2, maxBlocksPerSeq: 4, hQ: 16, dtype: 'fp16' }), 'ERR_DTYPE')
  await caught(t, () => dev.captureStep({ kvCaches: [step.q(0)], batch: 2, maxBlocksPerSeq: 4, hQ: 16 }), 'ERR_INVALID_ARGUMENT')
  await caught(t, () => step.q(1), 'ERR_INVALID_ARGUMENT')
  step.dispose()
  await caught(t, () => step.replay(), 'ERR_DISPOSED')
})

both('soak: 10k serving steps with forks and frees stay flat in memory and exact', async (t, dev) => {
  t.timeout(10 * 60_000)
  const rng = new Rng(BASE_SEED ^ 0x50a4)
  const [b, hQ, layers, limit] = [4, 16, 2, 150]
  const width = Math.ceil(limit / 64)
  using cache = new KvCache(dev, { numBlocks: 2 * b * (width + 1), dtype: 'bf16' })
  const slots = Array.from({ length: b }, () => {
    const s = cache.createSequence()
    cache.append(s, randomF32(rng, (1 + rng.int(limit / 2)) * D, 'scaled'))
    return s
  })
  const bt = dev.zeros([b, width], 'int32')
  const sl = dev.zeros([b], 'int32')
  cache.batchInto(slots, bt, sl)
  using plan = dev.plan(sl, { hQ })
  const qs = Array.from({ length: layers }, () => dev.tensor(randomF32(rng, b * hQ * D, 'scaled'), [b, 1, hQ, D], 'bf16'))
  const outs = qs.map(() => ({ out: dev.zeros([b, 1, hQ, 512], 'bf16'), lse: dev.zeros([b, hQ, 1], 'fp32') }))
  using step = dev.captureStep({ kvCaches: qs.map(() => cache), batch: b, maxBlocksPerSeq: width, hQ, causal: true })
  qs.forEach((q, l) => step.q(l).copyFrom(q))
  const token = toBits(randomF32(rng, b * D, 'scaled'), 'bf16')
  const tokenDev = dev.tensor(token, [b, 1, D], 'bf16')
  const steps = 10_000
  let base: { m: ReturnType<Device['memoryStats']>; rss: number } | undefined
  let forks = 0
  let frees = 0
  let checks = 0
  for (let i = 0; i < steps; i++) {
    for (let k = 0; k < b; k++) {
      if (cache.seqLen(slots[k]!) + 1 > limit) {
        cache.free(slots[k]!)
        frees++
        const other = slots[(k + 1 + rng.int(b - 1)) % b]!
        if (rng.next() < 0.5 && cache.seqLen(other) < limit - 10) {
          slots[k] = cache.fork(other)
          forks++
        } else {
          slots[k] = cache.createSequence()
          cache.append(slots[k]!, randomF32(rng, (1 + rng.int(40)) * D, 'scaled'))
        }
      }
    }
    cache.appendBatch(slots, i % 3 === 0 ? tokenDev : token)
    if (i % 2 === 0) {
      cache.batchInto(slots, bt, sl)
      plan.update(sl)
      for (let l = 0; l < layers; l++)
        decodeInto({ q: qs[l]!, kvCache: cache, blockTable: bt, cacheSeqlens: sl, plan, causal: true }, outs[l]!)
    } else {
      step.setBatch(cache, slots)
      step.replay()
    }
    dev.synchronizeSync()
    if (i % 500 >= 498) {
      const e = cache.batch(slots, width)
      for (let l = 0; l < layers; l++) {
        const r = decodeSync({ q: qs[l]!, kvCache: cache, blockTable: e.blockTable, cacheSeqlens: e.cacheSeqlens, causal: true })
        const got = i % 2 === 0 ? outs[l]!.out.toUint16ArraySync() : step.out(l).toUint16ArraySync()
        if (!Buffer.from(got.buffer).equals(Buffer.from(r.out.toUint16ArraySync().buffer)))
          t.fail(`step ${i} layer ${l}: differs from an eager decode`)
        r.out.dispose()
        r.lse.dispose()
      }
      e.blockTable.dispose()
      e.cacheSeqlens.dispose()
      checks++
    }
    if (i === steps / 10) base = { m: dev.memoryStats(), rss: process.memoryUsage().rss }
  }
  await dev.synchronize()
  const m = dev.memoryStats()
  const rss = process.memoryUsage().rss
  t.log(`${forks} forks, ${frees} frees, ${checks} checks; ${JSON.stringify(base?.m)} -> ${JSON.stringify(m)}; rss ${base?.rss} -> ${rss}`)
  t.true(forks > 10 && frees > 10 && checks > 0)
  t.true(m.hostTensorBytes <= base!.m.hostTensorBytes, 'host tensor bytes do not grow')
  t.is(m.pendingSteps, 0)
  t.true(m.deviceLiveBuffers <= base!.m.deviceLiveBuffers, 'device buffers do not grow')
  t.true(m.deviceLiveBytes <= base!.m.deviceLiveBytes, 'device bytes do not grow')
  t.true(m.poolReservedBytes <= Math.max(base!.m.poolReservedBytes, base!.m.poolUsedBytes) + 8 * 2 ** 20, 'pool does not grow')
  t.true(rss <= base!.rss + 48 * 2 ** 20, `resident memory ${base!.rss} -> ${rss}`)
  for (const s of slots) cache.free(s)
  t.is(cache.freeBlocks, cache.numBlocks)
})

// The completion poller of awaited CUDA decodes (index.ts whenDone), with stand-in polls:
// on the CPU backend decode computes on the pool and never polls.
test.serial(
  'the await poller: resolves when the poll does, rejects with the step error, falls back after the budget, keeps the loop free',
  async (t) => {
    const polls = [0, 0, 0]
    const doneAfter = [3, 1, 6]
    let fallbacks = 0
    let otherWork = 0
    const timer = setInterval(() => otherWork++, 0)
    const waits = doneAfter.map((n, i) =>
      _whenDone(
        () => ++polls[i]! >= n,
        () => {
          fallbacks++
          return Promise.resolve()
        },
        1e6,
      ),
    )
    await Promise.all(waits)
    t.deepEqual(polls, doneAfter, 'each step polled until done, and no more')
    t.is(fallbacks, 0)
    // A failed step: the poll throws the binding's error (a string code); the promise rejects
    // with it as an MlaError.
    const failing = _whenDone(
      () => {
        throw Object.assign(new Error('step 7 (layer 1): block_table: ...'), { code: 'ERR_BLOCK_INDEX' })
      },
      () => Promise.resolve(),
      1e6,
    )
    const e = await t.throwsAsync(failing)
    t.true(e instanceof MlaError && e.code === 'ERR_BLOCK_INDEX', String(e))
    // Past the budget the wait goes to the fallback, whose outcome is the promise's.
    let fellBack = 0
    await _whenDone(
      () => false,
      () => (fellBack++, new Promise<void>((r) => setTimeout(r, 5))),
      1000,
    )
    t.is(fellBack, 1)
    await t.throwsAsync(
      _whenDone(
        () => false,
        () => Promise.reject(new MlaError('ERR_CUDA', 'x')),
        1,
      ),
      { message: 'x' },
    )
    // A zero budget waits on the fallback at once, without polling.
    let polled = false
    await _whenDone(
      () => (polled = true),
      () => Promise.resolve(),
      0,
    )
    t.false(polled)
    // Other callbacks ran while polling (the loop was never blocked).
    const before = otherWork
    const t0 = performance.now()
    await _whenDone(
      () => performance.now() > t0 + 20,
      () => Promise.resolve(),
      1e6,
    )
    clearInterval(timer)
    t.true(otherWork > before, `timers ran during polling (${before} -> ${otherWork})`)
  },
)

both('awaited decodes: polled and pool completions agree; concurrent awaits; a bad step rejects alone, with its id', async (t, dev) => {
  const c = servingCase([90, 300, 1, 64])
  const args = caseTensors(dev, c)
  const plan = dev.plan(args.cacheSeqlens, { sQ: 2, hQ: 16 })
  try {
    // The default budget (polled), the pool at once (0), and a budget that runs out (1 us).
    for (const spin of [undefined, 0, 1]) {
      _setAwaitSpinUs(spin)
      const r = await decode({ ...args, plan, causal: true })
      await expectExact(t, `spin ${spin ?? 'default'}`, c, r)
      r.out.dispose()
      r.lse.dispose()
      const bad = badTable(dev, c, c.numBlocks + 1)
      const [good, failed, good2] = await Promise.allSettled([
        decode({ ...args, plan, causal: true, label: 'ok' }),
        decode({ ...args, blockTable: bad, plan, causal: true, label: 'bad' }),
        decode({ ...args, plan, causal: true, label: 'ok too' }),
      ])
      t.is(good.status, 'fulfilled')
      t.is(good2.status, 'fulfilled')
      t.is(failed.status, 'rejected')
      if (failed.status === 'rejected') {
        const e = failed.reason as MlaError
        t.true(e instanceof MlaError && e.code === 'ERR_BLOCK_INDEX', String(e))
        t.is(e.stepLabel, 'bad')
      }
      for (const x of [good, good2]) {
        if (x.status === 'fulfilled') {
          await expectExact(t, `concurrent, spin ${spin ?? 'default'}`, c, x.value)
          x.value.out.dispose()
          x.value.lse.dispose()
        }
      }
      bad.dispose()
      await t.notThrowsAsync(dev.synchronize(), 'the bad step was reported once, by its own promise')
    }
  } finally {
    _setAwaitSpinUs(undefined)
  }
})
