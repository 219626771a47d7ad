// The paged cache through the TypeScript API: append, fork (copy-on-write), free,
// exhaustion, batch.

import { spawnSync } from 'node:child_process'
import test, { type ExecutionContext } from 'ava'
import { Device, KvCache, MlaError, decode, type ErrorCode } from '../index'
import { D, Rng, BASE_SEED, randomF32, toBits } from './_helpers'

const cpu = Device.open('cpu')
const rng = new Rng(BASE_SEED ^ 0xcace)

function throwsCode(t: ExecutionContext, f: () => unknown, code: ErrorCode): void {
  const e = t.throws(f, { instanceOf: MlaError })
  t.is((e as MlaError | undefined)?.code, code, (e as Error | undefined)?.message)
}

/** Token `tok` of `seq` as raw bits, read back from the pool. */
function rowOf(cache: KvCache, seq: number, tok: number): Uint16Array {
  const pool = cache.tensor.toUint16ArraySync()
  const blk = cache.blockIds(seq)[Math.floor(tok / 64)]!
  const at = (blk * 64 + (tok % 64)) * D
  return pool.slice(at, at + D)
}

test('a fresh cache: empty sequences take no block', (t) => {
  using cache = new KvCache(cpu, { numBlocks: 4, dtype: 'bf16' })
  t.is(cache.numBlocks, 4)
  t.is(cache.freeBlocks, 4)
  t.is(cache.dtype, 'bf16')
  t.is(cache.device.kind, 'cpu')
  const s = cache.createSequence()
  t.is(cache.seqLen(s), 0)
  t.deepEqual(cache.blockIds(s), [])
  t.deepEqual(cache.sequences(), [s])
  t.is(cache.freeBlocks, 4)
  t.deepEqual(cache.tensor.shape, [4, 64, 1, D])
  t.is(cache.tensor.dtype, 'bf16')
  t.is(cache.tensor.storage, 'cache')
  t.true(cache.tensor.sameStorage(cache.tensor))
})

test('append grows block by block; rows land where blockIds say', (t) => {
  for (const dtype of ['bf16', 'fp16'] as const) {
    using cache = new KvCache(cpu, { numBlocks: 8, dtype })
    const s = cache.createSequence()
    const rows = toBits(randomF32(rng, 130 * D, 'plain'), dtype)
    cache.append(s, rows.subarray(0, 1 * D))
    t.is(cache.seqLen(s), 1)
    t.is(cache.blockIds(s).length, 1)
    cache.append(s, rows.subarray(1 * D, 64 * D))
    t.is(cache.seqLen(s), 64)
    t.is(cache.blockIds(s).length, 1)
    cache.append(s, rows.subarray(64 * D, 65 * D))
    t.is(cache.blockIds(s).length, 2)
    cache.append(s, rows.subarray(65 * D))
    t.is(cache.seqLen(s), 130)
    t.is(cache.blockIds(s).length, 3)
    t.is(cache.freeBlocks, 5)
    for (const tok of [0, 63, 64, 65, 129]) t.deepEqual(rowOf(cache, s, tok), rows.slice(tok * D, (tok + 1) * D))
    // f32 rows are rounded to the cache's dtype.
    const f = randomF32(rng, 2 * D, 'scaled')
    cache.append(s, f)
    t.deepEqual(rowOf(cache, s, 131), toBits(f, dtype).slice(D))
    // Appending nothing is fine.
    cache.append(s, new Float32Array(0))
    t.is(cache.seqLen(s), 132)
  }
})

test('append: partial rows -> ERR_SHAPE, wrong type -> ERR_INVALID_ARGUMENT', (t) => {
  using cache = new KvCache(cpu, { numBlocks: 2 })
  const s = cache.createSequence()
  throwsCode(t, () => cache.append(s, new Float32Array(D + 1)), 'ERR_SHAPE')
  throwsCode(t, () => cache.append(s, new Uint16Array(D - 1)), 'ERR_SHAPE')
  throwsCode(t, () => cache.append(s, new Int32Array(D) as unknown as Float32Array), 'ERR_INVALID_ARGUMENT')
  t.is(cache.seqLen(s), 0)
})

test('exhaustion is all-or-nothing', (t) => {
  using cache = new KvCache(cpu, { numBlocks: 3, dtype: 'fp16' })
  const a = cache.createSequence()
  const b = cache.createSequence()
  cache.append(a, new Float32Array(100 * D).fill(0.5))
  t.is(cache.freeBlocks, 1)
  const e = t.throws(() => cache.append(b, new Float32Array(65 * D)), { instanceOf: MlaError })
  t.is(e?.code, 'ERR_CACHE_EXHAUSTED')
  t.regex(e?.message ?? '', /free blocks/)
  t.is(cache.seqLen(b), 0)
  t.is(cache.freeBlocks, 1)
  // 28 more rows fit in a's last block, 29 do not.
  throwsCode(t, () => cache.append(a, new Float32Array(93 * D)), 'ERR_CACHE_EXHAUSTED')
  t.is(cache.seqLen(a), 100)
  cache.append(a, new Float32Array(92 * D))
  t.is(cache.seqLen(a), 192)
  t.is(cache.freeBlocks, 0)
  throwsCode(t, () => cache.append(b, new Float32Array(D)), 'ERR_CACHE_EXHAUSTED')
  cache.free(a)
  t.is(cache.freeBlocks, 3)
  cache.append(b, new Float32Array(65 * D))
  t.is(cache.seqLen(b), 65)
})

test('fork shares blocks; appending copies only the shared partial last block', (t) => {
  using cache = new KvCache(cpu, { numBlocks: 8, dtype: 'bf16' })
  const a = cache.createSequence()
  const rows = toBits(randomF32(rng, 100 * D, 'scaled'), 'bf16')
  cache.append(a, rows)
  const free0 = cache.freeBlocks
  const b = cache.fork(a)
  t.not(a, b)
  t.is(cache.seqLen(b), 100)
  t.deepEqual(cache.blockIds(b), cache.blockIds(a))
  t.is(cache.freeBlocks, free0, 'a fork takes no block')
  const more = toBits(randomF32(rng, 3 * D, 'scaled'), 'bf16')
  cache.append(b, more)
  t.is(cache.seqLen(b), 103)
  t.is(cache.seqLen(a), 100)
  t.is(cache.blockIds(b)[0], cache.blockIds(a)[0], 'the full block stays shared')
  t.not(cache.blockIds(b)[1], cache.blockIds(a)[1], 'the partial block was copied')
  t.is(cache.freeBlocks, free0 - 1)
  for (const tok of [0, 64, 99]) {
    t.deepEqual(rowOf(cache, b, tok), rows.slice(tok * D, (tok + 1) * D))
    t.deepEqual(rowOf(cache, a, tok), rows.slice(tok * D, (tok + 1) * D))
  }
  t.deepEqual(rowOf(cache, b, 102), more.slice(2 * D))
  // a can still grow in place.
  cache.append(a, more.subarray(0, D))
  t.deepEqual(rowOf(cache, a, 100), more.slice(0, D))
  t.deepEqual(rowOf(cache, b, 100), more.slice(0, D))
  // Freeing a keeps the shared block alive for b.
  cache.free(a)
  t.deepEqual(rowOf(cache, b, 0), rows.slice(0, D))
  t.deepEqual(cache.sequences(), [b])
})

test('free returns blocks; freed and unknown ids -> ERR_UNKNOWN_SEQUENCE', (t) => {
  using cache = new KvCache(cpu, { numBlocks: 4 })
  const a = cache.createSequence()
  cache.append(a, new Float32Array(130 * D))
  t.is(cache.freeBlocks, 1)
  cache.free(a)
  t.is(cache.freeBlocks, 4)
  for (const f of [
    () => cache.seqLen(a),
    () => cache.free(a),
    () => cache.append(a, new Float32Array(D)),
    () => cache.fork(a),
    () => cache.blockIds(a),
    () => cache.batch([a]),
    () => cache.seqLen(12345),
    () => cache.seqLen(-1),
  ]) {
    throwsCode(t, f, 'ERR_UNKNOWN_SEQUENCE')
  }
  const b = cache.createSequence()
  t.not(b, a, 'ids are never reused')
})

test('batch: block table with padding, lengths, explicit width', (t) => {
  using cache = new KvCache(cpu, { numBlocks: 8 })
  const a = cache.createSequence()
  const b = cache.createSequence()
  const c = cache.createSequence()
  cache.append(a, new Float32Array(130 * D))
  cache.append(b, new Float32Array(1 * D))
  const { blockTable, cacheSeqlens } = cache.batch([a, b, c, a])
  t.deepEqual(blockTable.shape, [4, 3])
  t.is(blockTable.dtype, 'int32')
  t.deepEqual([...cacheSeqlens.toInt32ArraySync()], [130, 1, 0, 130])
  const bt = [...blockTable.toInt32ArraySync()]
  t.deepEqual(bt.slice(0, 3), cache.blockIds(a))
  t.deepEqual(bt.slice(3, 4), cache.blockIds(b))
  t.deepEqual(bt.slice(9, 12), cache.blockIds(a))
  const wide = cache.batch([b], 5)
  t.deepEqual(wide.blockTable.shape, [1, 5])
  throwsCode(t, () => cache.batch([a], 2), 'ERR_INVALID_ARGUMENT')
  t.deepEqual(cache.batch([]).blockTable.shape[0], 0)
})

test('bad cache options', (t) => {
  throwsCode(t, () => new KvCache(cpu, { numBlocks: 0 }), 'ERR_INVALID_ARGUMENT')
  throwsCode(t, () => new KvCache(cpu, { numBlocks: 2, dtype: 'fp32' as 'bf16' }), 'ERR_DTYPE')
  throwsCode(t, () => new KvCache(cpu, { numBlocks: 2, dtype: 'e4m3' as 'bf16' }), 'ERR_DTYPE')
})

test('a decode holding the pool and cache calls made meanwhile', async (t) => {
  using cache = new KvCache(cpu, { numBlocks: 16 })
  const seqs = [0, 1, 2, 3].map(() => cache.createSequence())
  seqs.forEach((s, i) => cache.append(s, randomF32(rng, (60 + 70 * i) * D, 'scaled')))
  const { blockTable, cacheSeqlens } = cache.batch(seqs)
  const q = cpu.tensor(randomF32(rng, 4 * 64 * D, 'scaled'), [4, 1, 64, D], 'bf16')
  const pending = decode({ q, kvCache: cache, blockTable, cacheSeqlens })
  // These wait for the decode's lock (or run before it): either way they succeed.
  const s = cache.createSequence()
  cache.append(s, new Float32Array(D))
  cache.dispose()
  const { out } = await pending
  t.deepEqual(out.shape, [4, 1, 64, 512])
  t.false(Array.from(await out.toFloat32Array()).some((x) => !Number.isFinite(x)))
})

// Run in a child process: a deadlock would leave libuv threads blocked forever, which
// would keep this worker alive; the child is killed when it does not settle in time.
const SWAPPED_ROLES = `
const { Device, KvCache, decode } = require(${JSON.stringify(require.resolve('../index'))})
const cpu = Device.open('cpu')
const D = 576, N = 16, L = 256
const [A, B] = [new KvCache(cpu, { numBlocks: N }), new KvCache(cpu, { numBlocks: N })]
// q = one pool viewed as [N, 64, 1, 576] (b = N, sQ = 64, hQ = 1), kvCache = the other.
const bt = new Int32Array(N * (L / 64)).map((_, i) => i % N)
const args = (q, kv) => ({ q: q.tensor, kvCache: kv, blockTable: cpu.tensor(bt, [N, L / 64]), cacheSeqlens: cpu.tensor(new Int32Array(N).fill(L), [N]) })
;(async () => {
  for (let round = 0; round < 6; round++) {
    const p = []
    for (let i = 0; i < 8; i++) p.push(decode(i % 2 ? args(A, B) : args(B, A)))
    await Promise.all(p)
  }
  console.log('settled')
})().catch((e) => { console.error(e); process.exit(2) })
`

test('decodes with two pools in swapped roles (q = A.tensor, kv = B and the reverse) never deadlock', (t) => {
  const r = spawnSync(process.execPath, ['-e', SWAPPED_ROLES], {
    encoding: 'utf8',
    timeout: 60_000,
    killSignal: 'SIGKILL',
    env: { ...process.env, UV_THREADPOOL_SIZE: '8' },
  })
  t.is(r.signal, null, `the decodes did not settle within 60 s (deadlock?): killed by ${r.signal}\n${r.stderr}`)
  t.is(r.status, 0, r.stderr)
  t.is(r.stdout.trim(), 'settled')
})
