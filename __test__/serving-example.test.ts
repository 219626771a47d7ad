// The serving-path example of README.md ("## The serving path"), kept runnable: this file
// holds the same code (checked line for line against the README), and runs it on the CPU
// backend (and on CUDA with MLA_TEST_DEVICE=cuda, as the GPU suite sets).

import * as fs from 'node:fs'
import * as path from 'node:path'
import test from 'ava'
import { Device, KvCache, captureStep, decodeInto, MlaError } from '../index'

// Kept as the README has it (its aligned comments): not reformatted by prettier.
// prettier-ignore
async function example(log: (...xs: unknown[]) => void): Promise<void> {
  const console = { log }
  void Device, KvCache, captureStep, decodeInto, MlaError
  // README:begin

  using dev = Device.open()                                   // CUDA if usable, else the CPU
  const [b, hQ, layers] = [4, 16, 2]
  using cache = new KvCache(dev, { numBlocks: 64, dtype: 'bf16' })
  const seqs = Array.from({ length: b }, () => cache.createSequence())
  cache.appendBatch(seqs, new Float32Array(b * 100 * 576).fill(0.01))   // a 100-token prompt each

  // Everything a step touches is allocated once.
  const blockTable = dev.zeros([b, 8], 'int32')                // room for 8 * 64 tokens
  const cacheSeqlens = dev.zeros([b], 'int32')
  cache.batchInto(seqs, blockTable, cacheSeqlens)
  using plan = dev.plan(cacheSeqlens, { hQ })
  const qs = Array.from({ length: layers }, () => dev.tensor(new Float32Array(b * hQ * 576).fill(0.02), [b, 1, hQ, 576], 'bf16'))
  const outs = qs.map(() => ({ out: dev.zeros([b, 1, hQ, 512], 'bf16'), lse: dev.zeros([b, hQ, 1], 'fp32') }))
  const token = new Float32Array(b * 576).fill(0.03)           // the model's new latent rows

  for (let t = 0; t < 3; t++) {
    cache.appendBatch(seqs, token)                             // one call, one copy
    cache.batchInto(seqs, blockTable, cacheSeqlens)            // in place
    plan.update(cacheSeqlens)                                  // re-plan in place
    for (let l = 0; l < layers; l++) {
      decodeInto({ q: qs[l]!, kvCache: cache, blockTable, cacheSeqlens, plan, causal: true, label: `layer ${l}` }, outs[l]!)
    }
    await dev.synchronize()                                    // the only wait of the step
  }
  console.log(cacheSeqlens.toInt32ArraySync(), outs[1]!.out.toFloat32ArraySync().slice(0, 2))

  // A bad block index is reported by the next synchronising call, naming its step.
  const bad = dev.tensor(new Int32Array(b * 8).fill(999), [b, 8])
  const id = decodeInto({ q: qs[0]!, kvCache: cache, blockTable: bad, cacheSeqlens, plan, label: 'oops' }, outs[0]!)
  try {
    await dev.synchronize()
  } catch (e) {
    if (e instanceof MlaError) console.log(e.code, e.step === id, e.stepLabel)   // ERR_BLOCK_INDEX true oops
  }

  // The same step for every layer, captured once (a CUDA graph on CUDA) and replayed.
  using step = captureStep(dev, { kvCaches: [cache, cache], batch: b, maxBlocksPerSeq: 8, hQ, causal: true })
  for (let l = 0; l < layers; l++) step.q(l).copyFrom(qs[l]!)  // device to device
  for (let t = 0; t < 3; t++) {
    cache.appendBatch(seqs, token)
    step.setBatch(cache, seqs)
    step.replay()                                              // one launch: plan + 2 x (decode, combine)
    await dev.synchronize()
  }
  console.log(step.cacheSeqlens.toInt32ArraySync(), step.out(1).toFloat32ArraySync().slice(0, 2))
  // README:end
}

function readmeBlock(): string[] {
  const readme = fs.readFileSync(README, 'utf8')
  const section = readme.slice(readme.indexOf('## The serving path'))
  const block = section.slice(section.indexOf('```ts\n') + 6, section.indexOf('```\n', section.indexOf('```ts\n') + 6))
  return block.split('\n').slice(1) // without the import line
}

const README = path.join(__dirname, '..', '..', 'README.md')
const SOURCE = path.join(__dirname, '..', '..', '__test__', 'serving-example.test.ts')
// The packaged test run on the GPU machine carries neither the README nor the sources.
const sources = fs.existsSync(README) && fs.existsSync(SOURCE)
;(sources ? test : test.skip)(
  `${sources ? '' : 'README.md or the test sources are not here (packaged run) | '}the README serving example is this file's code`,
  (t) => {
    const src = fs.readFileSync(SOURCE, 'utf8')
    const mine = src
      .slice(src.indexOf('// README:begin\n') + 16, src.indexOf('  // README:end'))
      .split('\n')
      .map((l) => l.replace(/^  /, ''))
    t.deepEqual(mine, readmeBlock())
  },
)

test.serial('the README serving example runs and prints what the README says', async (t) => {
  const out: string[] = []
  await example((...xs) =>
    out.push(xs.map((x) => (ArrayBuffer.isView(x) ? `[${Array.from(x as Int32Array).join(',')}]` : String(x))).join(' ')),
  )
  t.log(out.join('\n'))
  t.is(out.length, 3)
  t.true(out[0]!.startsWith('[103,103,103,103]'), out[0])
  t.is(out[1], 'ERR_BLOCK_INDEX true oops')
  t.true(out[2]!.startsWith('[106,106,106,106]'), out[2])
  for (const line of [out[0]!, out[2]!]) {
    const vals = line.split(' ')[1]!.slice(1, -1).split(',').map(Number)
    t.true(
      vals.every((v) => Number.isFinite(v) && v > 0.01 && v < 0.03),
      line,
    )
  }
})
