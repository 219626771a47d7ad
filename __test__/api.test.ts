// The TypeScript API surface on the CPU backend: conversions, devices, tensors, plans,
// errors, disposal, concurrency.

import * as fs from 'node:fs'
import * as path from 'node:path'
import * as util from 'node:util'
import test from 'ava'
import {
  BLOCK_SIZE,
  DEFAULT_SOFTMAX_SCALE,
  Device,
  ERROR_CODES,
  HEAD_DIM,
  HEAD_DIM_V,
  KvCache,
  MlaError,
  Plan,
  Tensor,
  bf16ToF32,
  decode,
  decodeBytes,
  decodeFlops,
  decodeSync,
  f16ToF32,
  f32ToBf16,
  f32ToF16,
  flashMlaWithKvcache,
  getMlaMetadata,
  gpuStatus,
  type DType,
  type HalfDType,
} from '../index'
import { BASE_SEED, D, META_INTS, Rng, caseTensors, hostPlan, makeCase, planProblems, randomF32 } from './_helpers'
import { native } from '../src/native'

const cpu = Device.open('cpu')

test('constants', (t) => {
  t.is(HEAD_DIM, 576)
  t.is(HEAD_DIM_V, 512)
  t.is(BLOCK_SIZE, 64)
  t.is(DEFAULT_SOFTMAX_SCALE, 1 / 24)
})

test('ERROR_CODES lists every code of the Rust core (and ERR_INTERNAL), each once', (t) => {
  const src = fs.readFileSync(path.join(__dirname, '..', '..', 'crates', 'mla-core', 'src', 'error.rs'), 'utf8')
  const core = [...new Set([...src.matchAll(/"(ERR_[A-Z_]+)"/g)].map((m) => m[1]!))]
  t.true(core.includes('ERR_OUT_OF_MEMORY'))
  t.deepEqual([...ERROR_CODES].sort(), [...core, 'ERR_INTERNAL'].sort())
  t.is(new Set(ERROR_CODES).size, ERROR_CODES.length)
  t.true(Object.isFrozen(ERROR_CODES))
})

test('bf16 conversions round to nearest even and keep specials', (t) => {
  const x = new Float32Array([1, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5, 0, -0, Infinity, -Infinity, NaN, 3.4e38, 1e-40])
  const bits = f32ToBf16(x)
  t.true(bits instanceof Uint16Array)
  t.deepEqual([...bits.slice(0, 8)], [0x3f80, 0x3f80, 0x3f82, 0xc020, 0x0000, 0x8000, 0x7f80, 0xff80])
  t.true(Number.isNaN(bf16ToF32(bits.subarray(8, 9))[0]!))
  const back = bf16ToF32(bits)
  t.true(back instanceof Float32Array)
  t.deepEqual([...back.slice(0, 8)], [1, 1, 1 + 2 ** -6, -2.5, 0, -0, Infinity, -Infinity])
  // Every bf16 value round-trips exactly.
  const all = new Uint16Array(65536).map((_, i) => i)
  const rt = f32ToBf16(bf16ToF32(all))
  let mismatches = 0
  for (let i = 0; i < 65536; i++) {
    const nan = (i & 0x7f80) === 0x7f80 && (i & 0x7f) !== 0
    if (!nan && rt[i] !== i) mismatches++
  }
  t.is(mismatches, 0)
})

test('fp16 conversions round to nearest even, handle subnormals and overflow', (t) => {
  const x = new Float32Array([1, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 65504, 65520, 2 ** -24, 2 ** -25, -0, NaN])
  const bits = f32ToF16(x)
  t.deepEqual([...bits.slice(0, 8)], [0x3c00, 0x3c00, 0x3c02, 0x7bff, 0x7c00, 0x0001, 0x0000, 0x8000])
  t.true(Number.isNaN(f16ToF32(bits.subarray(8))[0]!))
  const all = new Uint16Array(65536).map((_, i) => i)
  const rt = f32ToF16(f16ToF32(all))
  let mismatches = 0
  for (let i = 0; i < 65536; i++) {
    const nan = (i & 0x7c00) === 0x7c00 && (i & 0x3ff) !== 0
    if (!nan && rt[i] !== i) mismatches++
  }
  t.is(mismatches, 0)
})

test('gpuStatus reports a consistent state', (t) => {
  const s = gpuStatus()
  t.is(typeof s.available, 'boolean')
  t.is(typeof s.deviceCount, 'number')
  t.is(typeof s.kernelsBuilt, 'boolean')
  t.is(s.kernelsCompiler !== undefined, s.kernelsBuilt)
  if (s.kernelsCompiler !== undefined) t.regex(s.kernelsCompiler, /^(NVRTC \d+\.\d+ \+ ptxas|nvcc) \d+\.\d+/)
  if (s.driverVersion !== undefined) {
    t.is(s.driverVersion.length, 2)
    t.true(s.driverVersion.every(Number.isInteger))
  } else t.false(s.available)
  if (s.available) t.is(s.reason, undefined)
  else t.is(typeof s.reason, 'string')
  t.log(JSON.stringify(s))
})

test('gpuStatus().kernelTargets: every cubin and the compute_80 PTX this build embeds', (t) => {
  const s = gpuStatus()
  if (!s.kernelsBuilt) {
    // A CPU-only build (no CUDA compiler): nothing embedded, and it says so.
    t.deepEqual(s.kernelTargets, [])
    t.log('CPU-only build: no kernel targets')
    return
  }
  t.deepEqual(s.kernelTargets, ['sm_80', 'sm_86', 'sm_89', 'sm_90a', 'sm_120', 'compute_80'])
  t.is(s.devices.length, s.deviceCount)
  for (const d of s.devices) {
    t.true(
      d.kernelPath === undefined ? typeof d.reason === 'string' : ['hopper', 'portable', 'portable-ptx'].includes(d.kernelPath),
      JSON.stringify(d),
    )
    if (d.kernelTarget !== undefined) t.true(s.kernelTargets.includes(d.kernelTarget))
  }
})

test('Device.open options are checked before anything opens', (t) => {
  const bad = (f: () => unknown, re: RegExp) => {
    const e = t.throws(f, { instanceOf: MlaError })
    t.is(e?.code, 'ERR_INVALID_ARGUMENT')
    t.regex(e?.message ?? '', re)
  }
  bad(
    () => Device.open('cuda', { kernelPath: 'sm80' as never }),
    /options\.kernelPath: expected one of 'hopper', 'portable', 'portable-ptx', got "sm80"/,
  )
  bad(() => Device.open('cuda', { portable: 1 as never }), /options\.portable: expected a boolean, got 1/)
  bad(() => Device.open('cuda', null as never), /options: expected an object/)
  // The CPU backend has no kernel path to choose.
  bad(() => Device.open('cpu', { portable: true }), /the 'cpu' device has none/)
  t.is(Device.open('cpu', {}).kind, 'cpu')
  // Without a usable GPU, asking for CUDA kernels never falls back to the CPU.
  if (!gpuStatus().available) {
    const e = t.throws(() => Device.open('auto', { portable: true }), { instanceOf: MlaError })
    t.true(['ERR_GPU_UNAVAILABLE', 'ERR_KERNELS_UNAVAILABLE', 'ERR_DRIVER_TOO_OLD'].includes(e?.code ?? ''), e?.message)
  }
})

test('the CPU device', (t) => {
  const d = Device.open('cpu')
  t.is(d.kind, 'cpu')
  const i = d.info
  t.is(i.kind, 'cpu')
  t.regex(i.name, /CPU/)
  t.deepEqual(i.computeCapability, [0, 0])
  t.is(i.kernelPath, undefined)
  t.true(i.multiprocessors >= 1)
  t.true(d.same(cpu))
  t.false(d.disposed)
  d[Symbol.dispose]()
  t.true(d.disposed)
})

test('Device.synchronize resolves on the CPU', async (t) => {
  await t.notThrowsAsync(cpu.synchronize())
  t.notThrows(() => cpu.synchronizeSync())
})

test('tensors: creation, shape, dtype, host copies', async (t) => {
  const f = new Float32Array([1.5, -2, 3.25, 0.1])
  const a = cpu.tensor(f, [2, 2], 'bf16')
  t.deepEqual(a.shape, [2, 2])
  t.is(a.dtype, 'bf16')
  t.is(a.nbytes, 8)
  t.is(a.devicePtr, null)
  t.is(a.storage, 'owned')
  t.true(a.device.same(cpu))
  t.deepEqual([...(await a.toFloat32Array())], [...bf16ToF32(f32ToBf16(f))])
  t.deepEqual([...(await a.toUint16Array())], [...f32ToBf16(f)])
  t.deepEqual([...a.toUint16ArraySync()], [...f32ToBf16(f)])
  const b = cpu.tensor(f32ToF16(f), [4], 'fp16')
  t.is(b.dtype, 'fp16')
  t.deepEqual([...b.toFloat32ArraySync()], [...f16ToF32(f32ToF16(f))])
  const c = cpu.tensor(f, [4])
  t.is(c.dtype, 'fp32')
  t.deepEqual([...c.toFloat32ArraySync()], [...f])
  const i = cpu.tensor(new Int32Array([7, -1, 2147480000]), [3])
  t.is(i.dtype, 'int32')
  t.deepEqual([...(await i.toInt32Array())], [7, -1, 2147480000])
  const z = cpu.zeros([2, 3], 'fp16')
  t.deepEqual([...z.toUint16ArraySync()], [0, 0, 0, 0, 0, 0])
  const e = cpu.tensor(new Float32Array(0), [0, 576], 'bf16')
  t.deepEqual(e.shape, [0, 576])
  t.is(e.toFloat32ArraySync().length, 0)
})

test('tensors: fill', (t) => {
  const a = cpu.tensor(new Float32Array(3), [3], 'bf16')
  a.fill(0xff)
  t.deepEqual([...a.toUint16ArraySync()], [0xffff, 0xffff, 0xffff])
  t.true(a.toFloat32ArraySync().every(Number.isNaN))
  const e = t.throws(() => a.fill(256), { instanceOf: MlaError })
  t.is(e?.code, 'ERR_INVALID_ARGUMENT')
})

test('plan: metadata layout and coverage (CPU), equal to the port of the scheduler', (t) => {
  for (const lens of [[1, 63, 64, 65, 140, 0], [0, 0, 0], [4096, 0, 8192, 64, 65, 1], [140]]) {
    const sl = cpu.tensor(Int32Array.from(lens), [lens.length])
    for (const [sQ, hQ] of [
      [1, 16],
      [2, 128],
    ] as const) {
      const plan = cpu.plan(sl, { sQ, hQ })
      t.true(plan instanceof Plan)
      t.is(plan.batch, lens.length)
      t.is(plan.rows, sQ * hQ)
      t.is(plan.numParts, cpu.info.multiprocessors)
      const meta = plan.tileSchedulerMetadata
      t.deepEqual(meta.shape, [plan.numParts, META_INTS])
      t.is(meta.dtype, 'int32')
      t.is(meta.storage, 'plan')
      t.deepEqual(plan.numSplits.shape, [lens.length + 1])
      const m = meta.toInt32ArraySync()
      const ns = plan.numSplits.toInt32ArraySync()
      t.deepEqual(planProblems(lens, m, ns, plan.numParts), [])
      const port = hostPlan(lens, plan.numParts)
      t.deepEqual([...m], [...port.meta])
      t.deepEqual([...ns], [...port.numSplits])
    }
  }
})

test('the scheduler port covers every block for many part counts', (t) => {
  const rng = new Rng(BASE_SEED)
  for (let k = 0; k < 50; k++) {
    const b = 1 + rng.int(20)
    const lens = Array.from({ length: b }, () => (rng.next() < 0.2 ? 0 : rng.int(20000)))
    const parts = 1 + rng.int(140)
    const p = hostPlan(lens, parts)
    t.deepEqual(planProblems(lens, p.meta, p.numSplits, parts), [], `lens ${lens} parts ${parts}`)
  }
})

test('getMlaMetadata returns the plan and its tensors', (t) => {
  const sl = cpu.tensor(new Int32Array([100, 70]), [2])
  const md = getMlaMetadata(sl, 32, 1)
  t.true(md.plan instanceof Plan)
  t.is(md.plan.rows, 32)
  t.true(md.tileSchedulerMetadata instanceof Tensor)
  t.true(md.tileSchedulerMetadata.sameStorage(md.plan.tileSchedulerMetadata))
  t.true(md.numSplits.sameStorage(md.plan.numSplits))
  t.false(md.numSplits.sameStorage(md.tileSchedulerMetadata))
})

test('disposing a plan leaves the metadata tensors handed out usable (they keep the plan alive)', async (t) => {
  const a = {
    q: cpu.tensor(new Float32Array(2 * 16 * HEAD_DIM).fill(0.01), [2, 1, 16, HEAD_DIM], 'bf16'),
    kv: cpu.tensor(new Float32Array(4 * 64 * HEAD_DIM).fill(0.01), [4, 64, 1, HEAD_DIM], 'bf16'),
    bt: cpu.tensor(new Int32Array([0, 1, 2, 3]), [2, 2]),
    sl: cpu.tensor(new Int32Array([100, 70]), [2]),
  }
  const md = getMlaMetadata(a.sl, 16, 1)
  const before = md.numSplits.toInt32ArraySync()
  md.plan.dispose()
  t.true(md.plan.disposed)
  t.false(md.tileSchedulerMetadata.disposed)
  t.false(md.numSplits.disposed)
  t.deepEqual(md.numSplits.toInt32ArraySync(), before)
  t.throws(() => md.plan.numSplits, { instanceOf: MlaError, message: /disposed/ })
  const [out] = await flashMlaWithKvcache(a.q, a.kv, a.bt, a.sl, 512, md.tileSchedulerMetadata, md.numSplits)
  t.deepEqual(out.shape, [2, 1, 16, HEAD_DIM_V])
  // And the other way round: disposing a metadata tensor leaves the plan usable.
  const plan = cpu.plan(a.sl, { hQ: 16 })
  plan.tileSchedulerMetadata.dispose()
  t.false(plan.tileSchedulerMetadata.disposed)
  t.deepEqual(plan.tileSchedulerMetadata.shape, [plan.numParts, 8])
})

test('MlaError carries the code and the native message', (t) => {
  const e = t.throws(() => cpu.tensor(new Int32Array(3), [2]), { instanceOf: MlaError })
  t.is(e?.code, 'ERR_SHAPE')
  t.is(e?.name, 'MlaError')
  t.regex(e?.message ?? '', /^data: expected 8 bytes for shape \[2\] of int32, got 12 bytes$/)
  t.true(e?.cause instanceof Error)
  t.is((e?.cause as { code?: string }).code, 'ERR_SHAPE')
})

test('decode is deterministic and the async form equals the sync form; concurrent decodes agree', async (t) => {
  const c = makeCase({ name: 'det', dtype: 'bf16', sQ: 2, hQ: 16, seqlens: [1, 63, 64, 65, 140, 0], causal: true }, 'scaled', BASE_SEED)
  const args = caseTensors(cpu, c)
  const s = decodeSync({ ...args, causal: true })
  const sOut = s.out.toUint16ArraySync()
  const sLse = s.lse.toFloat32ArraySync()
  const many = await Promise.all(Array.from({ length: 6 }, () => decode({ ...args, causal: true })))
  for (const r of many) {
    t.deepEqual(await r.out.toUint16Array(), sOut)
    t.deepEqual(await r.lse.toFloat32Array(), sLse)
  }
  // Pending decodes sharing one plan (serialised natively per plan).
  const plan = cpu.plan(args.cacheSeqlens, { sQ: 2, hQ: 16 })
  const shared = await Promise.all(Array.from({ length: 6 }, () => decode({ ...args, plan, causal: true })))
  for (const r of shared) t.deepEqual(await r.out.toUint16Array(), sOut)
  // The plan changes how work is split, not the result beyond rounding.
  t.deepEqual(s.out.shape, [6, 2, 16, 512])
})

test('the contract metrics', (t) => {
  t.is(decodeBytes([100, 200], 2, 16), (300 * 576 + 2 * 2 * 16 * 576 + 2 * 2 * 16 * 512) * 2)
  t.is(decodeFlops([100, 200], 2, 16), 2 * 2 * 300 * 16 * (576 + 512))
})

test('the contract metrics come from the core: lengths and counts are checked, not truncated', (t) => {
  for (const bad of [[1.5], [-1], [NaN], [2 ** 31]]) {
    const e = t.throws(() => decodeBytes(bad, 1, 16))
    t.is((e as MlaError).code, 'ERR_INVALID_ARGUMENT', String(bad))
    t.regex(e!.message, /seqlens\[0\]/)
  }
  t.is((t.throws(() => decodeFlops([64], 1.5, 16)) as MlaError).code, 'ERR_INVALID_ARGUMENT')
  t.is((t.throws(() => decodeBytes(null as unknown as number[], 1, 16)) as MlaError).code, 'ERR_INVALID_ARGUMENT')
  // Lengths past 2^24 (f32's integers) stay exact: the core sums in f64.
  t.is(decodeBytes([2 ** 30 + 1, 2 ** 30 + 3], 1, 1), ((2 ** 31 + 4) * 576 + 2 * 576 + 2 * 512) * 2)
})

test('the scheduling metadata layout: the row the kernels and the core share', (t) => {
  const l = native.schedMetaLayout()
  t.is(l.ints, META_INTS)
  t.is(l.ints, 8)
  t.deepEqual(
    l.fields.map((f) => [f.name, f.index, f.offset]),
    [
      ['begin_seq', 0, 0],
      ['begin_block', 1, 4],
      ['end_seq', 2, 8],
      ['end_block', 3, 12],
      ['begin_split', 4, 16],
    ],
  )
  t.true(l.splitFixedCost >= 1)
})

test('an unrelated random q over the same cache keeps outputs finite (plain N(0,1))', async (t) => {
  const rng = new Rng(BASE_SEED + 1)
  const c = makeCase({ name: 'x', dtype: 'fp16', sQ: 1, hQ: 64, seqlens: [140, 65], causal: false }, 'plain', BASE_SEED + 2)
  const args = caseTensors(cpu, c)
  const q = cpu.tensor(randomF32(rng, 2 * 64 * D, 'plain'), [2, 1, 64, D], 'fp16')
  const { out, lse } = await decode({ ...args, q })
  t.true((await out.toFloat32Array()).every(Number.isFinite))
  t.true((await lse.toFloat32Array()).every(Number.isFinite))
})

test('numBlocks: one name and one range in every message', (t) => {
  const cpu = Device.open('cpu')
  const messages = [0, 1.5, -1, 2 ** 31 - 4095, 2 ** 40, NaN].map((n) => {
    const e = t.throws(() => new KvCache(cpu, { numBlocks: n }), { instanceOf: MlaError })!
    t.is((e as MlaError).code, 'ERR_INVALID_ARGUMENT')
    return e.message.replace(/got .*$/, 'got _')
  })
  t.deepEqual(new Set(messages), new Set(['numBlocks: expected an integer within [1, 2147479552], got _']))
})

test('dtype aliases name the same types, and properties report the short names', (t) => {
  const cpu = Device.open('cpu')
  for (const [alias, name] of [
    ['bfloat16', 'bf16'],
    ['float16', 'fp16'],
    ['f16', 'fp16'],
    ['float32', 'fp32'],
    ['f32', 'fp32'],
    ['i32', 'int32'],
  ] as const) {
    t.is(cpu.zeros([2], alias as DType).dtype, name)
  }
  t.is(new KvCache(cpu, { numBlocks: 1, dtype: 'bfloat16' as HalfDType }).dtype, 'bf16')
  const e = t.throws(() => cpu.zeros([2], 'half' as DType), { instanceOf: MlaError })!
  t.is((e as MlaError).code, 'ERR_DTYPE')
})

test('util.inspect shows what a Device, Tensor, Plan and KvCache are', (t) => {
  const cpu = Device.open('cpu')
  const cache = new KvCache(cpu, { numBlocks: 3 })
  cache.append(cache.createSequence(), new Float32Array(70 * D))
  const { cacheSeqlens } = cache.batch([0])
  const q = cpu.tensor(new Float32Array(2 * D), [1, 1, 2, D], 'bf16')
  const plan = cpu.plan(cacheSeqlens, { hQ: 2 })
  const show = (x: unknown) => util.inspect(x, { breakLength: Infinity })
  t.is(show(cpu), `Device { kind: 'cpu', name: '${cpu.info.name}' }`)
  t.is(show(q), `Tensor { shape: [ 1, 1, 2, ${D} ], dtype: 'bf16', device: 'cpu', storage: 'owned', nbytes: ${2 * D * 2} }`)
  t.is(show(plan), `Plan { batch: 1, rows: 2, numParts: ${plan.numParts}, batchInvariant: false }`)
  t.is(show(cache), `KvCache { numBlocks: 3, freeBlocks: 1, dtype: 'bf16', sequences: 1, device: 'cpu' }`)
  q.dispose()
  t.is(show(q), 'Tensor <disposed>')
})
