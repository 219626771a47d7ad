// Bad input through the TypeScript API: every contract rule -> its error code, with a
// message naming the argument. Nothing here needs a GPU (except where stated).

import test from 'ava'
import {
  Device,
  KvCache,
  MlaError,
  bench,
  decode,
  decodeSync,
  flashMlaWithKvcache,
  getMlaMetadata,
  gpuStatus,
  type DecodeArgs,
  type ErrorCode,
  type Tensor,
} from '../index'
import { D, GARBAGE, expectCode } from './_helpers'

const cpu = Device.open('cpu')

/** A valid call: b = 2, s_q = 1, h_q = 16, bf16, 4 blocks, lengths [100, 70]. */
function valid(over: Partial<Record<'q' | 'kv' | 'bt' | 'sl', Tensor>> = {}): DecodeArgs {
  return {
    q: over.q ?? cpu.tensor(new Float32Array(2 * 16 * D).fill(0.01), [2, 1, 16, D], 'bf16'),
    kvCache: over.kv ?? cpu.tensor(new Float32Array(4 * 64 * D).fill(0.01), [4, 64, 1, D], 'bf16'),
    blockTable: over.bt ?? cpu.tensor(new Int32Array([0, 1, 2, 3]), [2, 2]),
    cacheSeqlens: over.sl ?? cpu.tensor(new Int32Array([100, 70]), [2]),
  }
}

test('the valid baseline decodes', async (t) => {
  const { out, lse } = await decode(valid())
  t.deepEqual(out.shape, [2, 1, 16, 512])
  t.deepEqual(lse.shape, [2, 16, 1])
  t.is(out.dtype, 'bf16')
  t.is(lse.dtype, 'fp32')
})

const bad: [string, () => DecodeArgs, ErrorCode, string][] = [
  ['q of rank 3', () => valid({ q: cpu.tensor(new Float32Array(2 * 16 * D), [2, 16, D], 'bf16') }), 'ERR_SHAPE', 'q'],
  ['q in fp32', () => valid({ q: cpu.tensor(new Float32Array(2 * 16 * D), [2, 1, 16, D], 'fp32') }), 'ERR_DTYPE', 'q'],
  ['q int32', () => valid({ q: cpu.tensor(new Int32Array(2 * 16 * D), [2, 1, 16, D]) }), 'ERR_DTYPE', 'q'],
  ['q with d = 512', () => valid({ q: cpu.tensor(new Float32Array(2 * 16 * 512), [2, 1, 16, 512], 'bf16') }), 'ERR_INVALID_ARGUMENT', 'd'],
  ['q with s_q = 0', () => valid({ q: cpu.tensor(new Float32Array(0), [2, 0, 16, D], 'bf16') }), 'ERR_SHAPE', 'q'],
  [
    'cache in fp16 with a bf16 q',
    () => valid({ kv: cpu.tensor(new Float32Array(4 * 64 * D), [4, 64, 1, D], 'fp16') }),
    'ERR_DTYPE',
    'kv_cache',
  ],
  ['cache of rank 3', () => valid({ kv: cpu.tensor(new Float32Array(4 * 64 * D), [4, 64, D], 'bf16') }), 'ERR_SHAPE', 'kv_cache'],
  [
    'block size 32',
    () => valid({ kv: cpu.tensor(new Float32Array(8 * 32 * D), [8, 32, 1, D], 'bf16') }),
    'ERR_INVALID_ARGUMENT',
    'block_size',
  ],
  ['cache d = 512', () => valid({ kv: cpu.tensor(new Float32Array(4 * 64 * 512), [4, 64, 1, 512], 'bf16') }), 'ERR_INVALID_ARGUMENT', 'd'],
  ['h_kv = 2', () => valid({ kv: cpu.tensor(new Float32Array(4 * 64 * 2 * D), [4, 64, 2, D], 'bf16') }), 'ERR_INVALID_ARGUMENT', 'h_kv'],
  ['block table in fp32', () => valid({ bt: cpu.tensor(new Float32Array(4), [2, 2], 'fp32') }), 'ERR_DTYPE', 'block_table'],
  ['block table for 3 sequences', () => valid({ bt: cpu.tensor(new Int32Array(6), [3, 2]) }), 'ERR_SHAPE', 'block_table'],
  ['block table of rank 1', () => valid({ bt: cpu.tensor(new Int32Array(4), [4]) }), 'ERR_SHAPE', 'block_table'],
  ['seqlens of shape [3]', () => valid({ sl: cpu.tensor(new Int32Array([1, 2, 3]), [3]) }), 'ERR_SHAPE', 'cache_seqlens'],
  ['seqlens in fp32', () => valid({ sl: cpu.tensor(new Float32Array([1, 2]), [2], 'fp32') }), 'ERR_DTYPE', 'cache_seqlens'],
  [
    'seqlen past max_blocks_per_seq * 64',
    () => valid({ sl: cpu.tensor(new Int32Array([129, 70]), [2]) }),
    'ERR_SEQLEN_RANGE',
    'cache_seqlens[0]',
  ],
  ['negative seqlen', () => valid({ sl: cpu.tensor(new Int32Array([100, -1]), [2]) }), 'ERR_SEQLEN_RANGE', 'cache_seqlens[1]'],
  [
    'block index = num_blocks',
    () => valid({ bt: cpu.tensor(new Int32Array([0, 4, 2, 3]), [2, 2]) }),
    'ERR_BLOCK_INDEX',
    'block_table[0][1]',
  ],
  ['negative block index', () => valid({ bt: cpu.tensor(new Int32Array([0, 1, -1, 3]), [2, 2]) }), 'ERR_BLOCK_INDEX', 'block_table[1][0]'],
  [
    'garbage block index that would be read',
    () => valid({ bt: cpu.tensor(new Int32Array([0, 1, 2, GARBAGE]), [2, 2]) }),
    'ERR_BLOCK_INDEX',
    'block_table[1][1]',
  ],
]

for (const [name, args, code, mention] of bad) {
  test(`decode: ${name} -> ${code}`, async (t) => {
    await expectCode(t, () => decode(args()), code, mention)
  })
  test(`decodeSync: ${name} -> ${code}`, async (t) => {
    await expectCode(t, () => decodeSync(args()), code, mention)
  })
}

test("entries past a sequence's blocks are never read (garbage and negative tails are fine)", async (t) => {
  const bt = cpu.tensor(new Int32Array([0, 1, GARBAGE, 2, -5, GARBAGE]), [2, 3])
  const sl = cpu.tensor(new Int32Array([100, 64]), [2])
  await t.notThrowsAsync(decode(valid({ bt, sl })))
})

test('softmaxScale must be finite and > 0', async (t) => {
  for (const s of [0, -1, NaN, Infinity]) {
    await expectCode(t, () => decode({ ...valid(), softmaxScale: s }), 'ERR_INVALID_ARGUMENT', 'softmax_scale')
  }
  await expectCode(t, () => decode({ ...valid(), softmaxScale: '1' as unknown as number }), 'ERR_INVALID_ARGUMENT', 'softmaxScale')
})

test('a plan made for another batch or head count is rejected', async (t) => {
  const a = valid()
  const other = cpu.plan(cpu.tensor(new Int32Array([1, 2, 3]), [3]), { hQ: 16 })
  await expectCode(t, () => decode({ ...a, plan: other }), 'ERR_INVALID_ARGUMENT', 'plan')
  const rows = cpu.plan(a.cacheSeqlens, { hQ: 32 })
  await expectCode(t, () => decode({ ...a, plan: rows }), 'ERR_INVALID_ARGUMENT', 'plan')
  const sq = cpu.plan(a.cacheSeqlens, { sQ: 2, hQ: 16 })
  await expectCode(t, () => decode({ ...a, plan: sq }), 'ERR_INVALID_ARGUMENT', 'plan')
})

test('plan: bad arguments', async (t) => {
  const sl = cpu.tensor(new Int32Array([100, 70]), [2])
  await expectCode(t, () => cpu.plan(sl, { hQ: 16, hKv: 2 }), 'ERR_INVALID_ARGUMENT', 'h_kv')
  await expectCode(t, () => cpu.plan(sl, { hQ: 0 }), 'ERR_INVALID_ARGUMENT', 'hQ')
  await expectCode(t, () => cpu.plan(sl, { hQ: 1.5 }), 'ERR_INVALID_ARGUMENT', 'hQ')
  await expectCode(t, () => cpu.plan(cpu.tensor(new Int32Array([100, -70]), [2]), { hQ: 16 }), 'ERR_SEQLEN_RANGE', 'cache_seqlens[1]')
  await expectCode(t, () => cpu.plan(cpu.tensor(new Float32Array([1, 2]), [2], 'fp32'), { hQ: 16 }), 'ERR_DTYPE', 'cache_seqlens')
  await expectCode(t, () => cpu.plan(cpu.tensor(new Int32Array([1, 2]), [1, 2]), { hQ: 16 }), 'ERR_SHAPE', 'cache_seqlens')
  await expectCode(t, () => getMlaMetadata(sl, 16, 2), 'ERR_INVALID_ARGUMENT', 'h_kv')
  await expectCode(t, () => getMlaMetadata(sl, 0, 1), 'ERR_INVALID_ARGUMENT', 'numHeadsPerHeadK')
})

test('flashMlaWithKvcache: head_dim_v must be 512, metadata must come from getMlaMetadata', async (t) => {
  const a = valid()
  const md = getMlaMetadata(a.cacheSeqlens, 16, 1)
  const kv = a.kvCache as Tensor
  await expectCode(
    t,
    () => flashMlaWithKvcache(a.q, kv, a.blockTable, a.cacheSeqlens, 576, md.tileSchedulerMetadata, md.numSplits),
    'ERR_INVALID_ARGUMENT',
    'head_dim_v',
  )
  const fake = cpu.tensor(new Int32Array(16), [2, 8])
  await expectCode(
    t,
    () => flashMlaWithKvcache(a.q, kv, a.blockTable, a.cacheSeqlens, 512, fake, md.numSplits),
    'ERR_INVALID_ARGUMENT',
    'tile_scheduler_metadata',
  )
  const md2 = getMlaMetadata(a.cacheSeqlens, 16, 1)
  await expectCode(
    t,
    () => flashMlaWithKvcache(a.q, kv, a.blockTable, a.cacheSeqlens, 512, md.tileSchedulerMetadata, md2.numSplits),
    'ERR_INVALID_ARGUMENT',
    'num_splits',
  )
  await expectCode(
    t,
    () => flashMlaWithKvcache(a.q, kv, a.blockTable, a.cacheSeqlens, 512, null, md.numSplits),
    'ERR_INVALID_ARGUMENT',
    'tile_scheduler_metadata',
  )
  // The right pairs work, as does the Plan itself, or no metadata at all.
  await t.notThrowsAsync(flashMlaWithKvcache(a.q, kv, a.blockTable, a.cacheSeqlens, 512, md.tileSchedulerMetadata, md.numSplits))
  await t.notThrowsAsync(flashMlaWithKvcache(a.q, kv, a.blockTable, a.cacheSeqlens, 512, md.plan, null))
  await t.notThrowsAsync(flashMlaWithKvcache(a.q, kv, a.blockTable, a.cacheSeqlens, 512, null, null))
})

test('disposed objects throw ERR_DISPOSED', async (t) => {
  const a = valid()
  a.q.dispose()
  t.true(a.q.disposed)
  await expectCode(t, () => decode(a), 'ERR_DISPOSED', "'q'")
  await expectCode(t, () => a.q.shape, 'ERR_DISPOSED')
  await expectCode(t, () => a.q.toFloat32Array(), 'ERR_DISPOSED')
  const b = valid()
  ;(b.blockTable as Tensor).dispose()
  await expectCode(t, () => decodeSync(b), 'ERR_DISPOSED', "'blockTable'")
  const plan = cpu.plan(b.cacheSeqlens, { hQ: 16 })
  plan.dispose()
  await expectCode(t, () => plan.numParts, 'ERR_DISPOSED', 'plan')
  await expectCode(t, () => decode({ ...valid(), plan }), 'ERR_DISPOSED', 'plan')
  const dev = Device.open('cpu')
  dev.dispose()
  await expectCode(t, () => dev.tensor(new Int32Array(1), [1]), 'ERR_DISPOSED', 'device')
  await expectCode(t, () => dev.kind, 'ERR_DISPOSED')
  const cache = new KvCache(cpu, { numBlocks: 2 })
  const view = cache.tensor
  cache.dispose()
  await expectCode(t, () => cache.createSequence(), 'ERR_DISPOSED', 'cache')
  // A view of the pool keeps the pool alive.
  t.deepEqual(view.shape, [2, 64, 1, D])
  {
    using u = cpu.tensor(new Int32Array(1), [1])
    t.false(u.disposed)
  }
})

test('tensor creation: bad data, shape, dtype', async (t) => {
  await expectCode(t, () => cpu.tensor(new Float32Array(5), [2, 2], 'bf16'), 'ERR_SHAPE', 'data')
  await expectCode(t, () => cpu.tensor(new Int32Array(4), [2, -2]), 'ERR_SHAPE', 'shape')
  await expectCode(t, () => cpu.tensor(new Int32Array(4), [2, 2.5]), 'ERR_SHAPE', 'shape')
  await expectCode(t, () => cpu.tensor(new Int32Array(4), [2, 2], 'bf16' as 'int32'), 'ERR_DTYPE', 'dtype')
  await expectCode(t, () => cpu.tensor(new Float32Array(4), [2, 2], 'fp8' as 'bf16'), 'ERR_DTYPE', 'fp8')
  await expectCode(t, () => cpu.tensor(new Float32Array(4), [2, 2], 'int32' as 'bf16'), 'ERR_DTYPE', 'dtype')
  await expectCode(t, () => cpu.tensor(new Uint16Array(4), [2, 2], 'fp32' as 'bf16'), 'ERR_DTYPE', 'dtype')
  await expectCode(t, () => cpu.tensor(new Uint16Array(4), [2, 2], undefined as unknown as 'bf16'), 'ERR_DTYPE', 'dtype')
  await expectCode(t, () => cpu.tensor([1, 2] as unknown as Float32Array, [2]), 'ERR_INVALID_ARGUMENT', 'data')
  await expectCode(t, () => cpu.tensor(new Float64Array(2) as unknown as Float32Array, [2]), 'ERR_INVALID_ARGUMENT', 'data')
})

test('reading a tensor as the wrong type', async (t) => {
  const f = cpu.tensor(new Float32Array(4), [4], 'bf16')
  const i = cpu.tensor(new Int32Array(4), [4])
  await expectCode(t, () => f.toInt32Array(), 'ERR_DTYPE', 'int32')
  await expectCode(t, () => f.toInt32ArraySync(), 'ERR_DTYPE', 'int32')
  await expectCode(t, () => i.toFloat32Array(), 'ERR_DTYPE')
  await expectCode(t, () => i.toUint16Array(), 'ERR_DTYPE', 'bf16 or fp16')
  await expectCode(t, () => cpu.tensor(new Float32Array(1), [1], 'fp32').toUint16ArraySync(), 'ERR_DTYPE')
})

test('wrong JS types become ERR_INVALID_ARGUMENT', async (t) => {
  await expectCode(t, () => decode({ ...valid(), q: {} as Tensor }), 'ERR_INVALID_ARGUMENT', 'q')
  await expectCode(t, () => decode(undefined as unknown as DecodeArgs), 'ERR_INVALID_ARGUMENT')
  await expectCode(t, () => decode({ ...valid(), causal: 1 as unknown as boolean }), 'ERR_INVALID_ARGUMENT', 'causal')
  await expectCode(t, () => Device.open('gpu' as 'cpu'), 'ERR_INVALID_ARGUMENT', 'gpu')
  await expectCode(t, () => Device.open(3 as unknown as 'cpu'), 'ERR_INVALID_ARGUMENT', 'device')
  await expectCode(t, () => new KvCache(cpu, { numBlocks: -1 }), 'ERR_INVALID_ARGUMENT', 'numBlocks')
  await expectCode(t, () => new KvCache({} as Device, { numBlocks: 1 }), 'ERR_INVALID_ARGUMENT', 'device')
})

test("Device.open('cuda') never falls back to the CPU", async (t) => {
  const s = gpuStatus()
  if (s.available) {
    const d = Device.open('cuda')
    t.is(d.kind, 'cuda')
    await expectCode(t, () => Device.open(`cuda:${s.deviceCount}`), 'ERR_GPU_UNAVAILABLE')
    return
  }
  t.log(`no GPU: ${s.reason}`)
  const code: ErrorCode = s.deviceCount > 0 && !s.kernelsBuilt ? 'ERR_KERNELS_UNAVAILABLE' : 'ERR_GPU_UNAVAILABLE'
  await expectCode(t, () => Device.open('cuda'), code)
  await expectCode(t, () => Device.open('cuda:0'), code)
  await expectCode(t, () => Device.open(`cuda:${s.deviceCount}`), 'ERR_GPU_UNAVAILABLE')
  t.is(Device.open('auto').kind, 'cpu')
  t.is(Device.open().kind, 'cpu')
})

// Integer arguments: napi-rs would truncate or wrap them (1.5 -> 1, NaN -> 0, -1 as a u32
// -> 4294967295), so the TypeScript layer checks each one before the native call.
const notIntegers: [string, unknown][] = [
  ['fractional', 1.5],
  ['NaN', NaN],
  ['Infinity', Infinity],
  ['a string', '1'],
]

test('integer arguments: fractional, NaN, negative, huge -> an error naming the argument', async (t) => {
  const sl = cpu.tensor(new Int32Array([100, 70]), [2])
  using cache = new KvCache(cpu, { numBlocks: 4 })
  const s = cache.createSequence()
  cache.append(s, new Float32Array(70 * D))
  for (const [what, v] of notIntegers) {
    const n = v as number
    t.log(what)
    await expectCode(t, () => cache.append(n, new Float32Array(D)), 'ERR_INVALID_ARGUMENT', 'seq')
    await expectCode(t, () => cache.seqLen(n), 'ERR_INVALID_ARGUMENT', 'seq')
    await expectCode(t, () => cache.fork(n), 'ERR_INVALID_ARGUMENT', 'seq')
    await expectCode(t, () => cache.free(n), 'ERR_INVALID_ARGUMENT', 'seq')
    await expectCode(t, () => cache.blockIds(n), 'ERR_INVALID_ARGUMENT', 'seq')
    await expectCode(t, () => cache.batch([s, n]), 'ERR_INVALID_ARGUMENT', 'seqs[1]')
    await expectCode(t, () => cache.batch([s], n), 'ERR_INVALID_ARGUMENT', 'maxBlocksPerSeq')
    await expectCode(t, () => cpu.plan(sl, { sQ: n, hQ: 16 }), 'ERR_INVALID_ARGUMENT', 'sQ')
    await expectCode(t, () => cpu.plan(sl, { hQ: n }), 'ERR_INVALID_ARGUMENT', 'hQ')
    await expectCode(t, () => cpu.plan(sl, { hQ: 16, hKv: n }), 'ERR_INVALID_ARGUMENT', 'hKv')
    await expectCode(t, () => getMlaMetadata(sl, n, 1), 'ERR_INVALID_ARGUMENT', 'numHeadsPerHeadK')
    await expectCode(t, () => getMlaMetadata(sl, 16, n), 'ERR_INVALID_ARGUMENT', 'numHeadsK')
    await expectCode(t, () => new KvCache(cpu, { numBlocks: n }), 'ERR_INVALID_ARGUMENT', 'numBlocks')
    await expectCode(t, () => cpu.zeros([2, n], 'int32'), 'ERR_SHAPE', 'shape[1]')
    await expectCode(t, () => cpu.tensor(new Int32Array(2), [n]), 'ERR_SHAPE', 'shape[0]')
    const a = valid()
    await expectCode(
      t,
      () => flashMlaWithKvcache(a.q, a.kvCache as Tensor, a.blockTable, a.cacheSeqlens, n, null, null),
      'ERR_INVALID_ARGUMENT',
      'head_dim_v',
    )
  }
  // The message shows the expected range and the value that came.
  const e = t.throws(() => cache.batch([s], 1.5), { instanceOf: MlaError })
  t.is(e?.message, 'maxBlocksPerSeq: expected an integer within [1, 33554431], got 1.5')
  // Negative and too large: -1 would wrap to 4294967295 as a u32.
  await expectCode(t, () => cache.batch([s], -1), 'ERR_INVALID_ARGUMENT', 'got -1')
  await expectCode(t, () => cache.batch([s], 2 ** 32 - 1), 'ERR_INVALID_ARGUMENT', 'maxBlocksPerSeq')
  await expectCode(t, () => cache.batch([s], 2 ** 25), 'ERR_INVALID_ARGUMENT', '33554431')
  await expectCode(t, () => cpu.plan(sl, { hQ: -16 }), 'ERR_INVALID_ARGUMENT', 'hQ')
  await expectCode(t, () => cpu.plan(sl, { hQ: 2 ** 31 }), 'ERR_INVALID_ARGUMENT', '2147483647')
  await expectCode(t, () => cpu.plan(sl, { sQ: 2 ** 31 - 1, hQ: 2 ** 31 - 1 }), 'ERR_INVALID_ARGUMENT', 'sQ * hQ')
  await expectCode(t, () => new KvCache(cpu, { numBlocks: 2 ** 40 }), 'ERR_INVALID_ARGUMENT', 'numBlocks')
  await expectCode(t, () => getMlaMetadata(sl, 2 ** 31 - 1, 2), 'ERR_INVALID_ARGUMENT', 'numHeadsPerHeadK * numHeadsK')
  await expectCode(t, () => cpu.zeros([2 ** 32], 'int32'), 'ERR_SHAPE', '4294967295')
  await expectCode(t, () => cache.seqLen(2 ** 53), 'ERR_INVALID_ARGUMENT', 'seq')
  // A negative integer id is an id no cache returns: ERR_UNKNOWN_SEQUENCE, like any other.
  await expectCode(t, () => cache.seqLen(-1), 'ERR_UNKNOWN_SEQUENCE')
  // Nothing was changed by the rejected calls.
  t.is(cache.seqLen(s), 70)
  t.deepEqual(cache.sequences(), [s])
})

test('bench.run: integer fields of the config and options are checked', async (t) => {
  const c = bench.configs('tiny')[0]!
  await expectCode(t, () => bench.run(cpu, { ...c, b: 1.5 }), 'ERR_INVALID_ARGUMENT', 'config.b')
  await expectCode(t, () => bench.run(cpu, { ...c, hQ: -1 }), 'ERR_INVALID_ARGUMENT', 'config.hQ')
  await expectCode(t, () => bench.run(cpu, { ...c, sQ: NaN }), 'ERR_INVALID_ARGUMENT', 'config.sQ')
  await expectCode(t, () => bench.run(cpu, { ...c, lens: [1, 2.5] }), 'ERR_INVALID_ARGUMENT', 'config.lens[1]')
  await expectCode(t, () => bench.run(cpu, c, { reps: 0.5 }), 'ERR_INVALID_ARGUMENT', 'reps')
  await expectCode(t, () => bench.run(cpu, c, { reps: -1 }), 'ERR_INVALID_ARGUMENT', 'reps')
})

test('the native shape check names its real limit (u32::MAX)', async (t) => {
  // Below index.ts: the binding itself, past the TypeScript checks.
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const native = require('../../binding.js') as typeof import('../binding')
  const dev = native.Device.open('cpu')
  const e = t.throws(() => dev.zeros([2, 2 ** 32], 'int32'))
  t.is((e as { code?: string } | undefined)?.code, 'ERR_SHAPE')
  t.regex(e?.message ?? '', /within \[0, 4294967295\]/)
  // And s_q * h_q that overflows is refused, not wrapped.
  const sl = dev.tensorFromI32(new Int32Array([100, 70]), [2])
  const p = t.throws(() => dev.plan(sl, 2 ** 40, 2 ** 40, 1))
  t.is((p as { code?: string } | undefined)?.code, 'ERR_INVALID_ARGUMENT')
  t.regex(p?.message ?? '', /^s_q \* h_q: expected at most 4294967295/)
})

test('memory that cannot be allocated -> ERR_OUT_OF_MEMORY', async (t) => {
  // 2^62 bytes: a valid size (no overflow), which no host can allocate.
  await expectCode(t, () => cpu.zeros([2 ** 31, 2 ** 29], 'fp32'), 'ERR_OUT_OF_MEMORY', 'allocate')
  // A size that overflows is a shape error.
  await expectCode(t, () => cpu.zeros([2 ** 32 - 1, 2 ** 32 - 1, 2 ** 32 - 1], 'fp32'), 'ERR_SHAPE', 'shape')
})
