// Several GPUs of one host from one process (issue 12): one Device per GPU, decoding at
// once from one JS thread (Promise.all). The GPU tests run on every GPU present; with
// fewer than two they are registered as skipped with the reason in their title
// ("no GPU: ..."). MLA_TEST_GPUS=2 makes a missing second GPU a failure. The CLI's
// `bench --devices` parsing and its typed error without a GPU run everywhere.

import { spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import test, { type ExecutionContext } from 'ava'
import { Device, MlaError, bench, bf16ToF32, decode, decodeInto, gpuStatus, type Tensor } from '../index'
import { BASE_SEED, DV, caseTensors, checkAccuracy, expectCode, makeCase, referenceDecode, Rng, type CaseData } from './_helpers'

const CLI = path.join(__dirname, '..', 'cli.js')
const status = gpuStatus()
const usable = status.devices.filter((d) => d.kernelPath != null).map((d) => d.ordinal)
const wantGpus = Number(process.env.MLA_TEST_GPUS ?? 0)

function cli(args: string[], timeout = 120_000) {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout, env: { ...process.env, CI: '1' } })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

/** Registers a test needing `n` GPUs, or a visibly skipped one with the reason. */
function gpusTest(n: number, title: string, fn: (t: ExecutionContext, devs: Device[]) => Promise<void>): void {
  if (usable.length < n && wantGpus < n) {
    const why = status.available ? `${usable.length} usable, ${n} needed` : (status.reason ?? 'unknown')
    test.skip(`no GPU: ${why} | gpu x${n}: ${title}`, () => undefined)
    return
  }
  test.serial(`gpu x${n}: ${title}`, async (t) => {
    t.true(usable.length >= n, `MLA_TEST_GPUS=${wantGpus}, but ${usable.length} usable: ${JSON.stringify(status)}`)
    const devs = usable.map((o) => Device.open(`cuda:${o}`))
    try {
      await fn(t, devs)
    } finally {
      for (const d of devs) d.dispose()
    }
  })
}

/** One decode of `c` on `dev` into outputs poisoned first (0xFF: NaN bits); the output bits and lse. */
async function runPoisoned(dev: Device, c: CaseData, rounds: number) {
  const x = caseTensors(dev, c)
  const { sQ, hQ } = c.cfg
  using plan = dev.plan(x.cacheSeqlens, { sQ, hQ })
  using out = dev.zeros([c.b, sQ, hQ, DV], c.cfg.dtype)
  using lse = dev.zeros([c.b, hQ, sQ], 'fp32')
  const args = { ...x, plan, causal: c.cfg.causal }
  const results: { out: Uint16Array; lse: Float32Array }[] = []
  try {
    for (let r = 0; r < rounds; r++) {
      out.fill(0xff)
      lse.fill(0xff)
      decodeInto(args, { out, lse })
      await dev.synchronize()
      results.push({ out: await out.toUint16Array(), lse: await lse.toFloat32Array() })
      // The promise form too (fresh outputs).
      const p = await decode(args)
      results.push({ out: await p.out.toUint16Array(), lse: await p.lse.toFloat32Array() })
      p.out.dispose()
      p.lse.dispose()
    }
  } finally {
    for (const tns of Object.values(x) as Tensor[]) tns.dispose()
  }
  return results
}

function sameBits(a: Float32Array, b: Float32Array): boolean {
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length)
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length)
  return x.length === y.length && x.every((v, i) => v === y[i])
}

gpusTest(2, 'concurrent decodes on every GPU equal each one alone, bit for bit', async (t, devs) => {
  t.log(`seed ${BASE_SEED}`)
  const rng = new Rng(BASE_SEED)
  // A different batch per GPU, long enough to overlap; fresh random inputs each run.
  const cases = devs.map((_, i) => {
    const seqlens = Array.from({ length: 3 + i }, () => 1 + rng.int(6000))
    const [sQ, hQ] = i % 2 === 0 ? [1, 16] : [2, 128]
    return makeCase({ name: `gpu ${i}`, dtype: 'bf16', sQ, hQ, seqlens, causal: sQ > 1 }, 'scaled', BASE_SEED + 17 * i)
  })
  const alone = []
  for (const [i, dev] of devs.entries()) {
    const r = (await runPoisoned(dev, cases[i]!, 1))[0]!
    const ref = referenceDecode(cases[i]!)
    checkAccuracy(t, `gpu ${i} alone`, 'bf16', bf16ToF32(r.out), r.lse, ref)
    alone.push(r)
  }
  const together = await Promise.all(devs.map((dev, i) => runPoisoned(dev, cases[i]!, 5)))
  for (const [i, rs] of together.entries()) {
    for (const [k, r] of rs.entries()) {
      t.deepEqual(r.out, alone[i]!.out, `gpu ${i} run ${k}: out differs from its single-GPU result`)
      t.true(sameBits(r.lse, alone[i]!.lse), `gpu ${i} run ${k}: lse differs`)
    }
  }
})

gpusTest(2, 'a bad block index on GPU 1 is reported on GPU 1 only; GPU 0 decodes exactly', async (t, devs) => {
  const [d0, d1] = devs as [Device, Device]
  const c = makeCase({ name: 'bad', dtype: 'bf16', sQ: 1, hQ: 16, seqlens: [300, 2000], causal: false }, 'scaled', BASE_SEED ^ 0x51)
  const want = (await runPoisoned(d0, c, 1))[0]!
  const bad = { ...c, blockTable: Int32Array.from(c.blockTable) }
  bad.blockTable[c.maxBlocksPerSeq + 3] = c.numBlocks // a block sequence 1 reads
  const x1 = caseTensors(d1, bad)
  using p1 = d1.plan(x1.cacheSeqlens, { hQ: 16 })
  const [good] = await Promise.all([
    runPoisoned(d0, c, 3),
    (async () => {
      let err: unknown
      try {
        await decode({ ...x1, plan: p1 })
      } catch (e) {
        err = e
      }
      t.true(err instanceof MlaError, `gpu 1: ${String(err)}`)
      const e = err as MlaError
      t.is(e.code, 'ERR_BLOCK_INDEX', e.message)
      t.true(typeof e.step === 'number' && e.step > 0, `step ${e.step}`)
      t.true(e.message.includes('block_table'), e.message)
    })(),
  ])
  for (const r of good) t.deepEqual(r.out, want.out, 'gpu 0 is exact beside the failing GPU 1')
  await t.notThrowsAsync(d0.synchronize())
  await t.notThrowsAsync(d1.synchronize())
  for (const tns of Object.values(x1) as Tensor[]) tns.dispose()
})

gpusTest(2, 'a tensor of GPU 0 in a GPU-1 decode -> ERR_DEVICE_MISMATCH, nothing launched', async (t, devs) => {
  const [d0, d1] = devs as [Device, Device]
  const c = makeCase({ name: 'mm', dtype: 'bf16', sQ: 1, hQ: 16, seqlens: [100, 200], causal: false }, 'scaled', BASE_SEED ^ 0x77)
  const a = caseTensors(d0, c)
  const b = caseTensors(d1, c)
  using plan = d1.plan(b.cacheSeqlens, { hQ: 16 })
  using p0 = d0.plan(a.cacheSeqlens, { hQ: 16 })
  await d0.synchronize()
  await d1.synchronize()
  const before = devs.map((d) => d.memoryStats().pendingSteps)
  for (const k of ['q', 'kvCache', 'blockTable', 'cacheSeqlens'] as const) {
    await expectCode(t, () => decode({ ...b, plan, [k]: a[k] }), 'ERR_DEVICE_MISMATCH')
  }
  await expectCode(t, () => decode({ ...b, plan: p0 }), 'ERR_DEVICE_MISMATCH', 'plan')
  // Nothing was launched: no step was added on either device, and both are clean.
  t.deepEqual(
    devs.map((d) => d.memoryStats().pendingSteps),
    before,
    'no step enqueued',
  )
  await t.notThrowsAsync(d0.synchronize())
  await t.notThrowsAsync(d1.synchronize())
  for (const tns of [...Object.values(a), ...Object.values(b)] as Tensor[]) tns.dispose()
})

gpusTest(1, 'bench --devices all runs on the GPUs present (one GPU: scaling about 1)', async (t) => {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'mla-multi-test-'))
  const r = cli(['bench', '--devices', 'all', '--filter', 'grid/1/4096/16/0', '--reps', '5', '--out', out])
  t.is(r.code, 0, r.stderr + r.stdout)
  t.log(r.stdout)
  const lines = fs.readFileSync(path.join(out, 'bench-multi.csv'), 'utf8').trim().split('\n')
  t.is(lines[0], 'tag,b,s_q,mean_sk,h_q,varlen,device,ms,gbps,tflops,scaling')
  t.is(lines.length, 1 + 1 + usable.length + 1)
  const total = lines.at(-1)!.split(',')
  t.is(total[6], 'total')
  const scaling = Number(total[10])
  t.true(scaling > 0.5 * usable.length && scaling < 1.2 * usable.length, `scaling ${scaling} on ${usable.length} GPU(s)`)
  fs.rmSync(out, { recursive: true, force: true })
})

// CPU-runnable: the parsing of --devices and its errors.

test('bench --devices: malformed lists and single-device flags are usage errors (exit 2)', (t) => {
  for (const [args, msg] of [
    [['--devices', '0,0'], /listed twice/],
    [['--devices', 'cuda:0'], /expected all or a list of CUDA ordinals/],
    [['--devices', ''], /expected all or a list/],
    [['--devices', '0,'], /expected all or a list/],
    [['--devices=-1'], /expected all or a list/],
    [['--devices', 'all', '--device', 'cuda'], /not with --device/],
    [['--devices', '0', '--host'], /not with --host/],
    [['--devices', '0', '--batch-invariant'], /not with --batch-invariant/],
    [['--devices', '0', '--anchors', 'x.csv'], /not with --anchors/],
    [['--devices', 'all', '--reps', '0'], /--reps: expected a positive integer/],
    [['--devices', 'all', '--filter', 'nope/'], /--filter: no configuration/],
  ] as const) {
    const r = cli(['bench', ...args])
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`)
    t.regex(r.stderr, msg, args.join(' '))
  }
  t.regex(cli(['--help']).stdout, /--devices all\|LIST/)
})

test('bench.resolveDevices: typed errors for a malformed list', (t) => {
  t.deepEqual(bench.resolveDevices('1,0'), [1, 0])
  for (const bad of ['', '0,0', 'x', '0,'])
    t.throws(() => bench.resolveDevices(bad), { instanceOf: MlaError, code: 'ERR_INVALID_ARGUMENT' } as never)
})

test('bench --devices all without a GPU: ERR_GPU_UNAVAILABLE, exit 1, no CPU fallback', async (t) => {
  if (status.available) {
    t.pass('a GPU is present: covered by the gpu test above')
    return
  }
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'mla-multi-test-'))
  for (const spec of ['all', '0', '0,1']) {
    const r = cli(['bench', '--devices', spec, '--tiny', '--out', out])
    t.is(r.code, 1, r.stderr + r.stdout)
    t.regex(r.stderr, /^mla-decode: ERR_GPU_UNAVAILABLE: /, spec)
    t.notRegex(r.stdout, /cpu/i)
  }
  t.regex(cli(['bench', '--devices', 'all', '--tiny', '--out', out]).stderr, /no usable CUDA device/)
  t.false(fs.existsSync(path.join(out, 'bench-multi.csv')))
  t.throws(() => bench.resolveDevices('all'), { instanceOf: MlaError, code: 'ERR_GPU_UNAVAILABLE' } as never)
  await t.throwsAsync(bench.runMulti([Device.open('cpu')], bench.configs('tiny')[0]!), { instanceOf: MlaError, message: /CUDA device/ })
  fs.rmSync(out, { recursive: true, force: true })
})
