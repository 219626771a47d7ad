// The hot calls (the decodes, Plan.update) take the native objects as ids, registered once
// per object and cached by its wrapper (crates/mla-node/src/handles.rs): a cached id must
// never outlive what it names. Objects disposed after their first use throw ERR_DISPOSED,
// ids freed by the garbage collector and reused name the new object, and ids that name
// nothing (the raw binding, below the TypeScript checks) are errors, never a crash.

import * as v8 from 'node:v8'
import * as vm from 'node:vm'
import test from 'ava'
import { Device, KvCache, Tensor, decodeInto, decodeSync, type DecodeArgs } from '../index'
import { D, expectCode } from './_helpers'

const cpu = Device.open('cpu')

function args(): DecodeArgs {
  return {
    q: cpu.tensor(new Float32Array(2 * 16 * D).fill(0.01), [2, 1, 16, D], 'bf16'),
    kvCache: cpu.tensor(
      new Float32Array(4 * 64 * D).map((_, i) => ((i % 7) - 3) / 16),
      [4, 64, 1, D],
      'bf16',
    ),
    blockTable: cpu.tensor(new Int32Array([0, 1, 2, 3]), [2, 2]),
    cacheSeqlens: cpu.tensor(new Int32Array([100, 70]), [2]),
  }
}

function outputs(): { out: Tensor; lse: Tensor } {
  return { out: cpu.zeros([2, 1, 16, 512], 'bf16'), lse: cpu.zeros([2, 16, 1], 'fp32') }
}

test('objects disposed after their first use throw ERR_DISPOSED', async (t) => {
  for (const k of ['q', 'kvCache', 'blockTable', 'cacheSeqlens'] as const) {
    const a = args()
    decodeInto(a, outputs())
    ;(a[k] as Tensor).dispose()
    await expectCode(t, () => decodeInto(a, outputs()), 'ERR_DISPOSED', `'${k}'`)
  }
  for (const k of ['out', 'lse'] as const) {
    const a = args()
    const o = outputs()
    decodeInto(a, o)
    o[k].dispose()
    await expectCode(t, () => decodeInto(a, o), 'ERR_DISPOSED', `'${k}'`)
  }
  // A plan: update and decode with it, then dispose it.
  const a = args()
  const plan = cpu.plan(a.cacheSeqlens, { hQ: 16 })
  plan.update(a.cacheSeqlens)
  decodeInto({ ...a, plan }, outputs())
  plan.dispose()
  await expectCode(t, () => plan.update(a.cacheSeqlens), 'ERR_DISPOSED', 'plan')
  await expectCode(t, () => decodeInto({ ...a, plan }, outputs()), 'ERR_DISPOSED', 'plan')
  // The lengths given to update, disposed after a first update.
  const p2 = cpu.plan(a.cacheSeqlens, { hQ: 16 })
  const sl = cpu.tensor(new Int32Array([100, 70]), [2])
  p2.update(sl)
  sl.dispose()
  await expectCode(t, () => p2.update(sl), 'ERR_DISPOSED', "'cacheSeqlens'")
  // A cache whose pool view was used, then disposed.
  const cache = new KvCache(cpu, { numBlocks: 4 })
  const s = [cache.createSequence(), cache.createSequence()]
  s.forEach((x, i) => cache.append(x, new Float32Array((100 - 30 * i) * D).fill(0.01)))
  const b = cache.batch(s)
  const ca = { q: a.q, kvCache: cache, blockTable: b.blockTable, cacheSeqlens: b.cacheSeqlens }
  decodeInto(ca, outputs())
  cache.dispose()
  await expectCode(t, () => decodeInto(ca, outputs()), 'ERR_DISPOSED', 'cache')
})

test('aliasing of outputs and inputs is still refused once the ids are cached', async (t) => {
  const a = args()
  const o = outputs()
  decodeInto(a, o)
  await expectCode(t, () => decodeInto(a, { out: o.out, lse: o.out }), 'ERR_INVALID_ARGUMENT', 'out, lse')
  await expectCode(t, () => decodeInto(a, { out: a.q, lse: o.lse }), 'ERR_INVALID_ARGUMENT', 'out')
  await expectCode(t, () => decodeInto(a, { out: o.out, lse: a.cacheSeqlens }), 'ERR_INVALID_ARGUMENT', 'lse')
  // The same native tensor behind two wrappers is the same tensor.
  const again = Tensor._wrap(o.out._n)
  await expectCode(t, () => decodeInto(a, { out: o.out, lse: again }), 'ERR_INVALID_ARGUMENT', 'out, lse')
  t.notThrows(() => decodeInto(a, o))
})

test('ids freed by the garbage collector are reused for new objects, which decode correctly', async (t) => {
  v8.setFlagsFromString('--expose-gc')
  const gc = vm.runInNewContext('gc') as () => void
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const native = require('../../binding.js') as typeof import('../binding')
  const seen = new Set<number>()
  let reused = 0
  for (let round = 0; round < 4; round++) {
    for (let i = 0; i < 8; i++) {
      const a = args()
      const ids = [a.q, a.kvCache, a.blockTable, a.cacheSeqlens].map((x) => native.tensorId((x as Tensor)._n))
      reused += ids.filter((id) => seen.has(id)).length
      ids.forEach((id) => seen.add(id))
      const o = outputs()
      const plan = cpu.plan(a.cacheSeqlens, { hQ: 16 })
      decodeInto({ ...a, plan }, o)
      const want = decodeSync(a)
      t.deepEqual(await o.out.toUint16Array(), await want.out.toUint16Array())
      t.deepEqual(await o.lse.toFloat32Array(), await want.lse.toFloat32Array())
    }
    // Nothing is disposed: the objects go with their wrappers, their ids with them.
    gc()
    for (let i = 0; i < 4; i++) await new Promise((r) => setImmediate(r))
  }
  t.log(`${reused} registrations reused a freed id; ${seen.size} distinct ids`)
  t.pass()
})

test('the raw binding: ids that name nothing, or an object of another kind, are errors', (t) => {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const native = require('../../binding.js') as typeof import('../binding')
  const dev = native.Device.open('cpu')
  const sl = dev.tensorFromI32(new Int32Array([100, 70]), [2])
  const plan = dev.plan(sl, 1, 16, 1)
  const slId = native.tensorId(sl)
  const planId = native.planId(plan)
  t.is(native.tensorId(sl), slId, 'one id per object')
  const code = (f: () => unknown) => {
    const e = t.throws(f)
    return (e as { code?: string } | undefined)?.code
  }
  t.is(
    code(() => native.planUpdate(planId, 0)),
    'ERR_INVALID_ARGUMENT',
  )
  t.is(
    code(() => native.planUpdate(planId, 2 ** 31)),
    'ERR_INVALID_ARGUMENT',
  )
  t.is(
    code(() => native.planUpdate(slId, slId)),
    'ERR_INVALID_ARGUMENT',
    'a tensor id is not a plan id',
  )
  t.is(
    code(() => native.planUpdate(planId, planId)),
    'ERR_INVALID_ARGUMENT',
    'nor a plan id a tensor id',
  )
  t.is(
    code(() => native.tensorId(plan as unknown as typeof sl)),
    'ERR_INVALID_ARGUMENT',
  )
  t.is(
    code(() => native.tensorId({} as typeof sl)),
    'ERR_INVALID_ARGUMENT',
  )
  t.is(
    code(() => native.planId(sl as unknown as typeof plan)),
    'ERR_INVALID_ARGUMENT',
  )
  t.notThrows(() => native.planUpdate(planId, slId))
})
