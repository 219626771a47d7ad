// The benchmark: the `bench` API on the CPU backend and the `mla-decode` command
// (dist/cli.js) end to end on the tiny suite: progress lines, table, CSV and SVG.

import { spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import test from 'ava'
import { Device, MlaError, bench, decodeBytes, decodeFlops, gpuStatus } from '../index'
import { svgChart, type Row } from '../cli'

const CLI = path.join(__dirname, '..', 'cli.js')
// The repository's anchors (dist/__test__ -> bench/anchors); a missing file fails the test.
const ANCHORS = path.join(__dirname, '..', '..', 'bench', 'anchors')
const CSV_HEADER = 'tag,b,s_q,mean_sk,h_q,varlen,ms,gbps,tflops,pct_copy_ceiling,floor_ms,anchor_ms,speedup'

function cli(args: string[], timeout = 60_000) {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout, env: { ...process.env, CI: '1' } })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

function tmpdir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'mla-bench-test-'))
}

test('suites: FlashMLA grid and beyond shapes, labels, CPU and tiny suites', (t) => {
  const full = bench.configs('flashmla')
  t.is(full.length, 48 + 8)
  t.is(full[0]!.label, 'grid/1/4096/16/0')
  t.true(full.every((c) => c.flashmlaShape))
  t.deepEqual(
    full.filter((c) => c.tag !== 'grid').map((c) => c.label),
    [
      'short/1/1024/16/0',
      'short/1/1024/128/0',
      'imbalanced/4/0/16/0',
      'imbalanced/1/0/16/0',
      'mtp/4/4096/16/0',
      'mtp/8/4096/16/0',
      'mtp/4/4096/128/0',
      'mtp/8/4096/128/0',
    ],
  )
  t.deepEqual(full.find((c) => c.tag === 'imbalanced')!.lens, [4641, 45118, 1730, 1696])
  t.is(bench.configs('flashmla', { quick: true }).length, 16 + 8)
  const cpu = bench.configs('cpu')
  t.true(cpu.every((c) => c.b <= 8))
  t.true(cpu.filter((c) => c.tag === 'grid').every((c) => !c.flashmlaShape))
  t.is(bench.defaultSuite(Device.open('cpu')), 'cpu')
  t.throws(() => bench.configs('nope' as bench.Suite), { instanceOf: MlaError, message: /suite/ })
})

test('anchors: both CSV formats, FlashMLA shapes only', (t) => {
  const grid = bench.loadAnchors(
    '# c\npeer,b,s_q,mean_sk,h_q,varlen,ms,tflops,gbps\nflashmla,128,1,4096,16,0,0.2532,72,2403\ntriton,128,1,4096,16,0,0.5,1,1\n',
  )
  t.deepEqual([...grid], [['grid/1/4096/16/0', 0.2532]])
  const beyond = bench.loadAnchors('tag,peer,b,s_q,mean_sk,h_q,ms,tflops,gbps\nimbalanced,flashmla,4,4,0,16,0.1003,74,617\n')
  t.deepEqual([...beyond], [['imbalanced/4/0/16/0', 0.1003]])
  const c = bench.configs('flashmla')[0]!
  t.is(bench.anchorFor(grid, c), 0.2532)
  t.is(bench.anchorFor(grid, { ...c, b: 8, flashmlaShape: false }), undefined)
  const h100 = new Map([
    ...bench.loadAnchors(fs.readFileSync(path.join(ANCHORS, 'flashmla-h100.csv'), 'utf8')),
    ...bench.loadAnchors(fs.readFileSync(path.join(ANCHORS, 'flashmla-h100-beyond.csv'), 'utf8')),
  ])
  const h200 = bench.loadAnchors(fs.readFileSync(path.join(ANCHORS, 'flashmla-h200.csv'), 'utf8'))
  for (const all of [h100, h200]) {
    t.is(all.size, 56)
    t.true(bench.configs('flashmla').every((x) => bench.anchorFor(all, x) !== undefined))
  }
})

test('bench.run measures a tiny configuration on the CPU with the contract formulas', async (t) => {
  const dev = Device.open('cpu')
  const c = bench.configs('tiny')[0]!
  const m = await bench.run(dev, c, { reps: 3 })
  t.is(m.reps, 3)
  t.true(m.ms > 0 && m.minMs <= m.ms && m.ms <= m.maxMs)
  const lens = new Array<number>(c.b).fill(c.mean)
  t.is(m.bytes, decodeBytes(lens, c.sQ, c.hQ))
  t.is(m.flops, decodeFlops(lens, c.sQ, c.hQ))
  t.true(Math.abs(m.gbps - m.bytes / (m.ms * 1e-3) / 1e9) < 1e-9 * m.gbps)
  t.true(Math.abs(m.tflops - m.flops / (m.ms * 1e-3) / 1e12) < 1e-9 * m.tflops)
  await t.throwsAsync(bench.run(dev, { ...c, b: 0 }), { instanceOf: MlaError, message: /b/ })
  await t.throwsAsync(bench.run(dev, c, { reps: 0 }), { instanceOf: MlaError, message: /reps/ })
  await t.throwsAsync(bench.run(dev, c, { dtype: 'fp32' as 'bf16' }), { instanceOf: MlaError })
})

test('mla-decode bench --tiny on the CPU writes the table, CSV and SVG', (t) => {
  const out = tmpdir()
  const t0 = Date.now()
  const r = cli(['bench', '--device', 'cpu', '--tiny', '--reps', '2', '--out', out])
  t.log(`${Date.now() - t0} ms`)
  t.is(r.code, 0, r.stderr + r.stdout)
  const n = bench.configs('tiny').length
  // One progress line per configuration, then the table.
  for (let i = 1; i <= n; i++) t.regex(r.stdout, new RegExp(`\\[${i}/${n}\\] \\S+  [0-9.]+ ms  [0-9.]+ GB/s  [0-9.]+ TFLOPS`))
  t.regex(r.stdout, /copy ceiling \d+ GB\/s/)
  t.regex(r.stdout, /label\s+b\s+ms\s+GB\/s\s+TFLOPS\s+%copy/)
  t.regex(r.stdout, /wrote .*bench\.csv, .*bench\.svg/)

  const lines = fs.readFileSync(path.join(out, 'bench.csv'), 'utf8').trim().split('\n')
  t.is(lines[0], CSV_HEADER)
  t.is(lines.length, 1 + n)
  const header = lines[0]!.split(',')
  for (const line of lines.slice(1)) {
    const f = line.split(',')
    t.is(f.length, header.length)
    for (const k of ['ms', 'gbps', 'tflops', 'pct_copy_ceiling', 'floor_ms']) {
      const v = Number(f[header.indexOf(k)])
      t.true(Number.isFinite(v) && v > 0, `${k} = ${f[header.indexOf(k)]} in ${line}`)
    }
  }

  const svg = fs.readFileSync(path.join(out, 'bench.svg'), 'utf8')
  t.true(svg.startsWith('<svg'))
  t.true(svg.trimEnd().endsWith('</svg>'))
  t.is(svg.match(/<rect class="bar gbps"/g)?.length, n)
  t.is(svg.match(/<rect class="bar tflops"/g)?.length, n)
  t.true((svg.match(/<rect /g)?.length ?? 0) >= n)
  t.is(svg.match(/class="ceiling"/g)?.length, 1)
  for (const c of bench.configs('tiny')) t.true(svg.includes(`>${c.label}</text>`))
  // Each row shows its time, and the legend explains the labels.
  t.is(svg.match(/<text class="ms"[^>]*>[0-9.]+<\/text>/g)?.length, n)
  t.regex(svg, /tag\/s_q\/mean\/h_q\/varlen/)
  // Balanced tags: every opened element is closed (a cheap well-formedness check).
  const opens = svg.match(/<(\w+)[^>]*[^/]>/g)?.filter((s) => !s.startsWith('</')).length ?? 0
  t.is(opens, svg.match(/<\/\w+>/g)?.length ?? -1)
  fs.rmSync(out, { recursive: true, force: true })
})

test('bench.run and mla-decode bench with --batch-invariant: the invariant plan and the default plan on the same inputs', async (t) => {
  const dev = Device.open('cpu')
  const c = bench.configs('tiny')[1]!
  const m = await bench.run(dev, c, { reps: 2, batchInvariant: true })
  t.true(m.ms > 0 && m.defaultMs !== undefined && m.defaultMs > 0, JSON.stringify(m))
  t.is((await bench.run(dev, c, { reps: 1 })).defaultMs ?? undefined, undefined)
  await t.throwsAsync(bench.run(dev, c, { batchInvariant: 'no' as unknown as boolean }), {
    instanceOf: MlaError,
    message: /batchInvariant/,
  })

  const out = tmpdir()
  const r = cli(['bench', '--device', 'cpu', '--tiny', '--reps', '1', '--batch-invariant', '--out', out])
  t.is(r.code, 0, r.stderr + r.stdout)
  t.regex(r.stdout, /x the default plan's time/)
  t.regex(r.stdout, /all: batch-invariant \/ default plan time, geometric mean [0-9.]+x over 3 configurations/)
  const lines = fs.readFileSync(path.join(out, 'bench.csv'), 'utf8').trim().split('\n')
  t.is(lines[0], CSV_HEADER + ',default_ms,vs_default')
  for (const line of lines.slice(1)) {
    const f = line.split(',')
    const [ms, dms, vs] = [Number(f[6]), Number(f[13]), Number(f[14])]
    t.true(ms > 0 && dms > 0 && Math.abs(vs - ms / dms) < 1e-3 * vs, line)
  }
  fs.rmSync(out, { recursive: true, force: true })
})

test('mla-decode bench --filter, --anchors, usage errors', (t) => {
  const out = tmpdir()
  const anchors = path.join(out, 'a.csv')
  fs.writeFileSync(anchors, 'peer,b,s_q,mean_sk,h_q,varlen,ms\nflashmla,128,1,4096,16,0,0.2532\n')
  const r = cli(['bench', '--device', 'cpu', '--tiny', '--filter', 'imbalanced', '--reps', '1', '--anchors', anchors, '--out', out])
  t.is(r.code, 0, r.stderr + r.stdout)
  t.regex(r.stdout, /\[1\/1\] imbalanced\/4\/0\/16\/0/)
  t.regex(r.stdout, /anchor ms\s+speedup/)
  t.regex(r.stdout, /no configuration of this run has an anchor/)
  t.is(fs.readFileSync(path.join(out, 'bench.csv'), 'utf8').trim().split('\n').length, 2)

  const bad = [
    ['bench', '--device', 'cpu', '--tiny', '--filter', 'nothing/'],
    ['bench', '--device', 'gpu'],
    ['bench', '--reps', '0'],
    ['bench', '--bogus'],
    ['bench', '--anchors', path.join(out, 'missing.csv')],
    ['frobnicate'],
  ]
  for (const args of bad) {
    const e = cli(args)
    t.is(e.code, 2, `${args.join(' ')}: ${e.stderr}`)
    t.regex(e.stderr, /^mla-decode: /)
  }
  fs.rmSync(out, { recursive: true, force: true })
})

test('mla-decode --help and info', (t) => {
  const h = cli(['--help'])
  t.is(h.code, 0)
  t.regex(h.stdout, /mla-decode bench/)
  t.regex(h.stdout, /--device auto\|cpu\|cuda\[:n\]/)
  t.regex(h.stdout, /b=8/)
  t.false(h.stdout.includes('--tiny'))
  const i = cli(['info', '--device', 'cpu'])
  t.is(i.code, 0, i.stderr)
  t.regex(i.stdout, /gpu: (available|unavailable)/)
  t.regex(i.stdout, /kernel targets: (none|sm_80, sm_86, sm_89, sm_90a, sm_120, compute_80)\n/)
  t.regex(i.stdout, /device \(cpu\): CPU backend/)
  t.true(fs.readFileSync(CLI, 'utf8').startsWith('#!/usr/bin/env node\n'))
})

test('the SVG chart marks anchors and the ceiling, and escapes text', (t) => {
  const configs = bench.configs('flashmla', { quick: true }).slice(0, 3)
  const rows: Row[] = configs.map((config, i) => {
    const lens = new Array<number>(config.b).fill(config.mean)
    const bytes = decodeBytes(lens, config.sQ, config.hQ)
    const flops = decodeFlops(lens, config.sQ, config.hQ)
    const ms = 0.25 + i * 0.01
    return {
      config,
      anchorMs: i === 0 ? undefined : 0.3,
      m: {
        ms,
        minMs: ms,
        maxMs: ms,
        reps: 30,
        b: config.b,
        totalSeqlen: config.b * config.mean,
        bytes,
        flops,
        gbps: bytes / ms / 1e6,
        tflops: flops / ms / 1e9,
      },
    }
  })
  const svg = svgChart(rows, 3000, { device: 'GPU <A&B>', date: '2026-01-01 00:00 UTC', suite: 'flashmla', dtype: 'bf16', reps: 30 })
  t.true(svg.startsWith('<svg'))
  t.true(svg.includes('GPU &lt;A&amp;B&gt;'))
  t.is(svg.match(/<line class="anchor"/g)?.length, 2 * 2)
  t.regex(svg, /copy ceiling 3000 GB\/s/)
  t.is(svg.match(/<rect class="bar /g)?.length, 2 * rows.length)
})

// On CUDA (the GPU machine sets MLA_TEST_DEVICE=cuda): the command end to end on one
// FlashMLA configuration, with an anchor. Without a GPU: listed as skipped, with why.
const gpu = gpuStatus()
const gpuEnabled = gpu.available || process.env.MLA_TEST_DEVICE === 'cuda'
const gpuTitle = 'mla-decode bench on CUDA: one FlashMLA configuration with its anchor'
if (!gpuEnabled) {
  test.skip(`no GPU: ${gpu.reason ?? 'unknown'} | gpu: ${gpuTitle}`, () => undefined)
} else {
  test.serial(`gpu: ${gpuTitle}`, (t) => {
    const out = tmpdir()
    const anchors = path.join(out, 'a.csv')
    fs.writeFileSync(anchors, 'peer,b,s_q,mean_sk,h_q,varlen,ms\nflashmla,128,1,4096,16,0,0.2532\n')
    const spec = process.env.MLA_TEST_CUDA_DEVICE ?? 'cuda'
    const r = cli(
      ['bench', '--device', spec, '--quick', '--filter', 'grid/1/4096/16/0', '--reps', '5', '--anchors', anchors, '--out', out],
      300_000,
    )
    t.log(r.stdout)
    t.is(r.code, 0, r.stderr + r.stdout)
    t.regex(r.stdout, /copy ceiling \d+ GB\/s \(1 GiB device-to-device/)
    t.regex(r.stdout, /grid: geometric mean speed-up vs FlashMLA anchors [0-9.]+x over 1 configurations/)
    const row = fs.readFileSync(path.join(out, 'bench.csv'), 'utf8').trim().split('\n')[1]!.split(',')
    t.is(row[0], 'grid')
    t.true(Number(row[7]) > 100, `GB/s ${row[7]}`)
    t.is(row[11], '0.2532')
    fs.rmSync(out, { recursive: true, force: true })
  })
}

test('mla-decode bench --host on the CPU writes host.csv and host-ops.csv', (t) => {
  const out = tmpdir()
  const r = cli(['bench', '--host', '--device', 'cpu', '--quick', '--steps', '3', '--out', out])
  t.is(r.code, 0, r.stderr)
  t.regex(r.stdout, /bench --host: CPU backend/)
  const rows = fs.readFileSync(path.join(out, 'host.csv'), 'utf8').trim().split('\n')
  t.is(rows[0], 'b,h_q,s_q,length,layers,mode,kernel_us,step_us')
  const body = rows.slice(1).map((l) => l.split(','))
  const modes = new Set(body.map((c) => c[5]))
  for (const m of ['await', 'sync', 'enqueue', 'graph']) t.true(modes.has(m), `mode ${m}`)
  for (const c of body) {
    t.is(c.length, 8)
    t.true(['await', 'sync', 'enqueue', 'graph'].includes(c[5]!))
    for (const k of [0, 1, 2, 3, 4]) t.true(Number.isInteger(Number(c[k])) && Number(c[k]) >= 1, `column ${k} of ${c}`)
    t.true(Number(c[6]) > 0 && Number(c[7]) > 0, `times of ${c}`)
  }
  t.deepEqual([...new Set(body.map((c) => c[4]))], ['1', '2'], 'layers 1 and 2')
  const ops = fs.readFileSync(path.join(out, 'host-ops.csv'), 'utf8').trim().split('\n')
  t.is(ops[0], 'b,h_q,s_q,length,op,us')
  t.deepEqual(
    ops.slice(1).map((l) => l.split(',')[4]),
    ['append-loop', 'appendBatch', 'appendBatch-device', 'appendBatch-f32', 'batch', 'batchInto', 'plan', 'plan.update'],
  )
  const bad = cli(['bench', '--host', '--device', 'cpu', '--modes', 'fast'])
  t.is(bad.code, 2)
  t.regex(bad.stderr, /--modes/)
  t.is(cli(['bench', '--steps', '3', '--device', 'cpu', '--tiny']).code, 2, '--steps without --host')
})

test('mla-decode bench --host-breakdown on the CPU writes host-breakdown.csv', (t) => {
  const out = tmpdir()
  const r = cli(['bench', '--host-breakdown', '--device', 'cpu', '--quick', '--steps', '3', '--out', out])
  t.is(r.code, 0, r.stderr)
  t.regex(r.stdout, /bench --host-breakdown: CPU backend/)
  const rows = fs.readFileSync(path.join(out, 'host-breakdown.csv'), 'utf8').trim().split('\n')
  t.is(rows[0], 'b,h_q,s_q,length,mode,phase,us,n')
  const body = rows.slice(1).map((l) => l.split(','))
  const modes = new Set(body.map((c) => c[4]))
  for (const m of ['await', 'await-pool', 'enqueue', 'appendBatch', 'appendBatch-device', 'appendBatch-f32', 'stub-pool', 'stub-poll'])
    t.true(modes.has(m), `mode ${m}`)
  for (const c of body) {
    t.is(c.length, 8, c.join(','))
    t.true(Number(c[6]) >= 0 && Number.isInteger(Number(c[7])) && Number(c[7]) >= 1, c.join(','))
  }
  t.true(
    body.some((c) => c[4] === 'enqueue' && c[5] === '"js:call -> native:enter"'),
    'enqueue phases start at the JS call',
  )
  t.is(cli(['bench', '--host-breakdown', '--host', '--device', 'cpu']).code, 2, '--host-breakdown with --host')
  fs.rmSync(out, { recursive: true, force: true })
})

test('bench.runHost and hostKernelUs on the CPU', async (t) => {
  const dev = Device.open('cpu')
  const [c] = bench.hostConfigs(dev, { quick: true })
  t.truthy(c)
  const k = await bench.hostKernelUs(dev, c!, 2)
  t.true(k > 0)
  const r = await bench.runHost(dev, { ...c!, layers: 1 }, { steps: 2, warmup: 1, modes: ['enqueue', 'sync'], ops: false })
  t.deepEqual(
    r.rows.map((x) => x.mode),
    ['enqueue', 'sync'],
  )
  t.deepEqual(r.ops, [])
  t.true(r.rows.every((x) => x.stepUs > 0 && x.kernelUs > 0 && x.b === c!.b))
  await t.throwsAsync(bench.runHost(dev, { ...c!, b: 0 }), { instanceOf: MlaError, message: /config.b/ })
  await t.throwsAsync(bench.hostKernelUs(dev, { ...c!, layers: 1.5 }), { instanceOf: MlaError })
})
