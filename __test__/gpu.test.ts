// CUDA backend tests. They run when gpuStatus().available; otherwise every test is
// registered as skipped, with a title that says why ("no GPU: <reason>").
// MLA_TEST_DEVICE=cuda forces them to run (and fail loudly) even when no GPU is found:
// the GPU machine sets it so that a broken driver or a build without kernels cannot pass
// as "skipped".

import test, { type ExecutionContext } from 'ava'
import { Device, KvCache, MlaError, decode, decodeSync, gpuStatus, type Tensor } from '../index'
import { accuracyCases, runCase } from './_accuracy'
import {
  BASE_SEED,
  D,
  GARBAGE,
  Rng,
  caseTensors,
  checkAccuracy,
  expectCode,
  hostPlan,
  makeCase,
  planProblems,
  randomF32,
  referenceDecode,
  relL2,
  tolerance,
  toBits,
  type CaseData,
} from './_helpers'

const status = gpuStatus()
const forced = process.env.MLA_TEST_DEVICE === 'cuda'
const enabled = status.available || forced
const spec = (process.env.MLA_TEST_CUDA_DEVICE ?? 'cuda') as 'cuda'

/** Registers a GPU test, or a visibly skipped one when there is no GPU. */
function gpuTest(title: string, fn: (t: ExecutionContext, dev: Device) => Promise<void> | void): void {
  if (!enabled) {
    test.skip(`no GPU: ${status.reason ?? 'unknown'} | gpu: ${title}`, () => undefined)
    return
  }
  test.serial(`gpu: ${title}`, async (t) => {
    await fn(t, gpu())
  })
}

let device: Device | undefined
function gpu(): Device {
  return (device ??= Device.open(spec))
}

if (forced) {
  test.serial('gpu: MLA_TEST_DEVICE=cuda: a usable GPU is present', (t) => {
    t.true(status.available, `gpuStatus(): ${JSON.stringify(status)}`)
  })
}

gpuTest('the device: kind, info, Device.open("auto") picks it, pointers are exposed', (t, dev) => {
  t.is(dev.kind, 'cuda')
  const i = dev.info
  t.log(JSON.stringify(i))
  t.true(i.computeCapability[0] >= 8, `compute capability ${i.computeCapability.join('.')}`)
  // The path follows the compute capability, or MLA_FORCE_PORTABLE (the PTX on Hopper).
  const forcedPortable = (process.env.MLA_FORCE_PORTABLE ?? '0') !== '0'
  const hopper = i.computeCapability[0] === 9 && i.computeCapability[1] === 0
  if (hopper) t.is(i.kernelPath, forcedPortable ? 'portable-ptx' : 'hopper')
  else t.true(i.kernelPath === 'portable' || i.kernelPath === 'portable-ptx', String(i.kernelPath))
  t.is(status.devices[i.ordinal]?.kernelPath, i.kernelPath)
  t.true(i.multiprocessors > 0)
  t.true(i.totalMemory > 0)
  t.is(Device.open('auto').kind, 'cuda')
  const x = dev.tensor(new Int32Array([1, 2, 3]), [3])
  t.is(typeof x.devicePtr, 'bigint')
  t.true((x.devicePtr ?? 0n) > 0n)
  t.true(x.device.same(dev))
  t.deepEqual([...x.toInt32ArraySync()], [1, 2, 3])
})

gpuTest('a device runs one kernel path per process: another one is refused while it is open', (t, dev) => {
  const i = dev.info
  const hopperCard = i.computeCapability[0] === 9 && i.computeCapability[1] === 0
  const other = i.kernelPath === 'hopper' ? 'portable-ptx' : 'hopper'
  const e = t.throws(() => Device.open(`cuda:${i.ordinal}`, { kernelPath: other }), { instanceOf: MlaError })
  // Hopper kernels on another card: the build has none for it; on a Hopper card: the open one wins.
  t.is(e?.code, hopperCard ? 'ERR_INVALID_ARGUMENT' : 'ERR_KERNELS_UNAVAILABLE', e?.message)
  t.true(Device.open(`cuda:${i.ordinal}`, { kernelPath: i.kernelPath! }).same(dev))
})

const cpu = Device.open('cpu')

for (const ac of accuracyCases()) {
  gpuTest(`${ac.title}: vs the f64 reference and vs the CPU backend`, async (t, dev) => {
    const c = ac.data()
    t.log(`case seed ${c.seed}; MLA_TEST_SEED=${BASE_SEED} replays the run`)
    const g = await runCase(dev, c, ac.mode)
    const err = checkAccuracy(t, ac.title, c.cfg.dtype, g.out, g.lse, ac.ref())
    const h = await runCase(cpu, c, ac.mode)
    const vsCpu = relL2(g.out, h.out)
    t.true(vsCpu <= tolerance(c.cfg.dtype), `GPU vs CPU rel L2 ${vsCpu}`)
    for (let i = 0; i < g.lse.length; i++) {
      if (h.lse[i] === Infinity || g.lse[i] === Infinity) t.is(g.lse[i], h.lse[i], `lse[${i}]`)
    }
    t.log(`rel L2 vs f64 ${err.toExponential(2)}, vs CPU ${vsCpu.toExponential(2)}`)
  })
}

function validOn(dev: Device, bt: Int32Array, lens: Int32Array) {
  const b = lens.length
  return {
    q: dev.tensor(randomF32(new Rng(BASE_SEED), b * 16 * D, 'scaled'), [b, 1, 16, D], 'bf16'),
    kvCache: dev.tensor(randomF32(new Rng(BASE_SEED + 1), 4 * 64 * D, 'scaled'), [4, 64, 1, D], 'bf16'),
    blockTable: dev.tensor(bt, [b, bt.length / b]),
    cacheSeqlens: dev.tensor(lens, [b]),
  }
}

gpuTest('a device-resident bad block index -> ERR_BLOCK_INDEX, and the device stays usable', async (t, dev) => {
  for (const bad of [4, -1, GARBAGE]) {
    const a = validOn(dev, new Int32Array([0, 1, 2, bad]), new Int32Array([100, 70]))
    await expectCode(t, () => decode(a), 'ERR_BLOCK_INDEX', 'block_table')
    const s = validOn(dev, new Int32Array([0, 1, 2, bad]), new Int32Array([100, 70]))
    await expectCode(t, () => decodeSync(s), 'ERR_BLOCK_INDEX', 'block_table')
  }
  // Garbage past the used blocks is never read; the error flag was cleared.
  const ok = validOn(dev, new Int32Array([0, 1, 2, GARBAGE]), new Int32Array([100, 64]))
  const { out } = await decode(ok)
  t.true((await out.toFloat32Array()).every(Number.isFinite))
  await t.notThrowsAsync(dev.synchronize())
})

gpuTest('a device-resident length out of range -> ERR_SEQLEN_RANGE', async (t, dev) => {
  for (const lens of [
    [129, 70],
    [100, -1],
  ]) {
    const a = validOn(dev, new Int32Array([0, 1, 2, 3]), Int32Array.from(lens))
    await expectCode(t, () => decode(a), 'ERR_SEQLEN_RANGE', 'cache_seqlens')
  }
  await t.notThrowsAsync(dev.synchronize())
})

gpuTest('tensors on different devices -> ERR_DEVICE_MISMATCH', async (t, dev) => {
  const g = validOn(dev, new Int32Array([0, 1, 2, 3]), new Int32Array([100, 70]))
  const h = validOn(cpu, new Int32Array([0, 1, 2, 3]), new Int32Array([100, 70]))
  await expectCode(t, () => decode({ ...g, kvCache: h.kvCache }), 'ERR_DEVICE_MISMATCH', 'kv_cache')
  await expectCode(t, () => decode({ ...g, blockTable: h.blockTable }), 'ERR_DEVICE_MISMATCH', 'block_table')
  await expectCode(
    t,
    () => decode({ ...g, cacheSeqlens: h.cacheSeqlens, plan: dev.plan(g.cacheSeqlens, { hQ: 16 }) }),
    'ERR_DEVICE_MISMATCH',
    'cache_seqlens',
  )
  await expectCode(t, () => decode({ ...g, plan: cpu.plan(h.cacheSeqlens, { hQ: 16 }) }), 'ERR_DEVICE_MISMATCH', 'plan')
  await expectCode(t, () => dev.plan(h.cacheSeqlens, { hQ: 16 }), 'ERR_DEVICE_MISMATCH', 'cache_seqlens')
})

gpuTest('plan: GPU metadata covers every block and equals the scheduler for its part count', (t, dev) => {
  const rng = new Rng(BASE_SEED)
  const sets = [[1, 63, 64, 65, 140, 0], [0, 0, 0], [4096, 0, 8192, 64, 65, 1, 16384, 5000], Array.from({ length: 128 }, () => 4096)]
  for (let k = 0; k < 4; k++) sets.push(Array.from({ length: 1 + rng.int(128) }, () => (rng.next() < 0.1 ? 0 : 1 + rng.int(20000))))
  for (const lens of sets) {
    for (const [sQ, hQ] of [
      [1, 16],
      [1, 128],
      [2, 64],
    ] as const) {
      const gp = dev.plan(dev.tensor(Int32Array.from(lens), [lens.length]), { sQ, hQ })
      const cp = cpu.plan(cpu.tensor(Int32Array.from(lens), [lens.length]), { sQ, hQ })
      const gm = gp.tileSchedulerMetadata.toInt32ArraySync()
      const gs = gp.numSplits.toInt32ArraySync()
      t.deepEqual(planProblems(lens, gm, gs, gp.numParts), [], `GPU plan, lens ${lens.length}, rows ${sQ * hQ}`)
      const cm = cp.tileSchedulerMetadata.toInt32ArraySync()
      const cs = cp.numSplits.toInt32ArraySync()
      t.deepEqual(planProblems(lens, cm, cs, cp.numParts), [], 'CPU plan')
      const port = hostPlan(lens, gp.numParts)
      t.deepEqual([...gm], [...port.meta], 'GPU metadata vs the host scheduler')
      t.deepEqual([...gs], [...port.numSplits], 'GPU num_splits vs the host scheduler')
      if (cp.numParts === gp.numParts) {
        t.deepEqual([...gm], [...cm])
        t.deepEqual([...gs], [...cs])
      }
    }
  }
})

gpuTest('a KvCache on the GPU: append, fork, batch, decode vs the reference', async (t, dev) => {
  const rng = new Rng(BASE_SEED ^ 0x9a9)
  for (const dtype of ['bf16', 'fp16'] as const) {
    using cache = new KvCache(dev, { numBlocks: 12, dtype })
    t.is(cache.tensor.device.kind, 'cuda')
    t.is(typeof cache.tensor.devicePtr, 'bigint')
    const a = cache.createSequence()
    const rows = toBits(randomF32(rng, 140 * D, 'scaled'), dtype)
    cache.append(a, rows.subarray(0, 70 * D))
    cache.append(a, rows.subarray(70 * D))
    const b = cache.fork(a)
    cache.append(b, toBits(randomF32(rng, 3 * D, 'scaled'), dtype))
    const e = cache.createSequence()
    const { blockTable, cacheSeqlens } = cache.batch([a, b, e])
    const sQ = 2
    const hQ = 64
    const qBits = toBits(randomF32(rng, 3 * sQ * hQ * D, 'scaled'), dtype)
    const c: CaseData = {
      cfg: { name: 'gpu cache', dtype, sQ, hQ, seqlens: [140, 143, 0], causal: true },
      dist: 'scaled',
      seed: 0,
      b: 3,
      numBlocks: 12,
      maxBlocksPerSeq: blockTable.shape[1]!,
      qBits,
      kvBits: await cache.tensor.toUint16Array(),
      blockTable: await blockTable.toInt32Array(),
      seqlens: await cacheSeqlens.toInt32Array(),
    }
    t.deepEqual(c.kvBits.slice(cache.blockIds(a)[0]! * 64 * D, cache.blockIds(a)[0]! * 64 * D + D), rows.slice(0, D))
    const q = dev.tensor(qBits, [3, sQ, hQ, D], dtype)
    const { out, lse } = await decode({ q, kvCache: cache, blockTable, cacheSeqlens, causal: true })
    checkAccuracy(t, `${dtype} gpu cache`, dtype, await out.toFloat32Array(), await lse.toFloat32Array(), referenceDecode(c))
  }
})

gpuTest('concurrent async decodes (own plans and one shared plan) agree with the sync form', async (t, dev) => {
  const c = makeCase({ name: 'conc', dtype: 'bf16', sQ: 1, hQ: 128, seqlens: [140, 65, 0, 1], causal: false }, 'scaled', BASE_SEED)
  const args = caseTensors(dev, c)
  const s = decodeSync(args)
  const want = s.out.toUint16ArraySync()
  const rs = await Promise.all(Array.from({ length: 8 }, () => decode(args)))
  for (const r of rs) t.deepEqual(await r.out.toUint16Array(), want)
  // Sharing one plan: its workspace of partial results is used by one decode at a time.
  const plan = dev.plan(args.cacheSeqlens, { hQ: 128 })
  const shared = await Promise.all(Array.from({ length: 8 }, () => decode({ ...args, plan })))
  for (const r of shared) t.deepEqual(await r.out.toUint16Array(), want)
  const outs: Tensor[] = rs.map((r) => r.out)
  outs.forEach((o) => o.dispose())
})
