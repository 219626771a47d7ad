/** `mla-decode bench`: FlashMLA's grid and beyond-grid shapes; a table, bench.csv, bench.svg. */

import * as fs from 'node:fs'
import * as path from 'node:path'
import { parseArgs } from 'node:util'
import { bench, type HalfDType } from '../../../index'
import { HELP } from '../help'
import { UsageError, openDevice, positiveInt, version } from '../args'
import { svgChart } from '../chart'
import { Progress } from '../progress'
import { csv, fmt, geomean, table, type Row } from '../report'
import { cmdBenchHost } from './host'
import { cmdBenchHostBreakdown } from './host-breakdown'
import { cmdBenchMulti, parseDevicesFlag } from './multi'

export async function cmdBench(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      device: { type: 'string', default: 'auto' },
      devices: { type: 'string' },
      quick: { type: 'boolean', default: false },
      suite: { type: 'string' },
      tiny: { type: 'boolean', default: false }, // hidden: the 'tiny' suite (tests)
      reps: { type: 'string' },
      dtype: { type: 'string', default: 'bf16' },
      filter: { type: 'string', default: '' },
      anchors: { type: 'string' },
      'matmul-tflops': { type: 'string' },
      out: { type: 'string', default: 'bench-out' },
      'no-progress': { type: 'boolean', default: false },
      'batch-invariant': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      host: { type: 'boolean', default: false },
      'host-breakdown': { type: 'boolean', default: false },
      steps: { type: 'string' },
      modes: { type: 'string' },
    },
  })
  if (values.help) {
    console.log(HELP)
    return 0
  }
  if (values.devices !== undefined) {
    // Several GPUs at once: its own command; the single-device flags do not apply.
    parseDevicesFlag(values.devices)
    const single = ['--device', '--host', '--host-breakdown', '--batch-invariant', '--anchors', '--matmul-tflops', '--steps', '--modes']
    const given = single.filter((f) => argv.some((a) => a === f || a.startsWith(`${f}=`)))
    if (given.length > 0) throw new UsageError(`--devices: not with ${given.join(', ')} (--device picks one device, --devices several)`)
    return cmdBenchMulti({ ...values, devices: values.devices })
  }
  if (values['host-breakdown']) {
    if (values.host || values.modes !== undefined) throw new UsageError('--host-breakdown runs on its own (no --host, no --modes)')
    return cmdBenchHostBreakdown(values)
  }
  if (values.host) return cmdBenchHost(values)
  if (values.steps !== undefined || values.modes !== undefined) throw new UsageError('--steps and --modes go with --host')
  const invariant = values['batch-invariant']
  const reps = positiveInt('reps', values.reps)
  const dtype = values.dtype
  if (dtype !== 'bf16' && dtype !== 'fp16') throw new UsageError(`--dtype: expected bf16 or fp16, got '${dtype}'`)
  const matmul = values['matmul-tflops'] === undefined ? NaN : Number(values['matmul-tflops'])
  if (values['matmul-tflops'] !== undefined && !(matmul > 0))
    throw new UsageError(`--matmul-tflops: expected a positive number, got '${values['matmul-tflops']}'`)
  let suiteOpt = values.suite
  if (values.tiny) suiteOpt = 'tiny'
  if (suiteOpt !== undefined && !['flashmla', 'cpu', 'tiny'].includes(suiteOpt))
    throw new UsageError(`--suite: expected flashmla or cpu, got '${suiteOpt}'`)

  // Anchors first: a missing file is a usage error before anything runs.
  const anchors = new Map<string, number>()
  for (const file of (values.anchors ?? '').split(',').filter((s) => s.length > 0)) {
    let text: string
    try {
      text = fs.readFileSync(file, 'utf8')
    } catch (e) {
      throw new UsageError(`--anchors: cannot read '${file}': ${(e as Error).message}`)
    }
    const a = bench.loadAnchors(text)
    if (a.size === 0) throw new UsageError(`--anchors: no FlashMLA rows in '${file}'`)
    for (const [k, v] of a) anchors.set(k, v)
  }

  using dev = openDevice(values.device)
  const info = dev.info
  const suite = (suiteOpt ?? bench.defaultSuite(dev)) as bench.Suite
  const configs = bench.configs(suite, { quick: values.quick }).filter((c) => c.label.startsWith(values.filter))
  if (configs.length === 0) {
    const all = bench.configs(suite, { quick: values.quick }).map((c) => c.label)
    throw new UsageError(
      `--filter: no configuration of the ${suite} suite starts with '${values.filter}'; labels: ${all.slice(0, 6).join(', ')}, ...`,
    )
  }
  const effReps = reps ?? (dev.kind === 'cuda' ? 30 : 5)
  const outDir = path.resolve(values.out)
  fs.mkdirSync(outDir, { recursive: true })

  console.log(
    `mla-decode ${version()} bench: ${info.name} (${dev.kind}${dev.kind === 'cuda' ? `:${info.ordinal}, ${info.multiprocessors} SMs` : ''})`,
  )
  console.log(
    `suite ${suite}${values.quick ? ' (quick)' : ''}: ${configs.length} configurations, ${dtype}, causal, median of ${effReps} runs${anchors.size ? `, ${anchors.size} anchors` : ''}`,
  )
  if (invariant)
    console.log('batch-invariant plans: ms is the invariant plan, default_ms the default plan on the same inputs (timed runs alternating)')
  if (suite === 'cpu')
    console.log("(CPU backend: a reduced grid at b=8; --suite flashmla runs FlashMLA's b=128 grid, far too slow on a few cores)")

  const live = process.stderr.isTTY === true && !values['no-progress'] && !process.env.CI
  const progress = new Progress(configs.length, live)
  const rows: Row[] = []
  let ceiling = NaN
  const date = new Date().toISOString().slice(0, 16).replace('T', ' ') + ' UTC'
  const writeOutputs = (): string[] => {
    if (!Number.isFinite(ceiling) || rows.length === 0) return []
    const csvPath = path.join(outDir, 'bench.csv')
    const svgPath = path.join(outDir, 'bench.svg')
    fs.writeFileSync(csvPath, csv(rows, ceiling, matmul))
    fs.writeFileSync(
      svgPath,
      svgChart(rows, ceiling, { device: info.name, date, suite: suite + (values.quick ? ' (quick)' : ''), dtype, reps: effReps }),
    )
    return [csvPath, svgPath]
  }
  // Ctrl-C: keep what was measured.
  const onSigint = () => {
    progress.end()
    const files = writeOutputs()
    process.stderr.write(
      `\ninterrupted after ${rows.length}/${configs.length} configurations${files.length ? `; wrote ${files.join(', ')}` : ''}\n`,
    )
    process.exit(130)
  }
  process.once('SIGINT', onSigint)

  try {
    progress.begin('copy ceiling', 0)
    ceiling = await bench.copyCeiling(dev)
    progress.log(
      `copy ceiling ${ceiling.toFixed(0)} GB/s (${dev.kind === 'cuda' ? '1 GiB device-to-device' : '256 MiB host copy'}, read + write)`,
    )
    const w = String(configs.length).length
    for (const [i, c] of configs.entries()) {
      progress.begin(c.label, i)
      const m = await bench.run(dev, c, { reps: effReps, dtype: dtype as HalfDType, ...(invariant ? { batchInvariant: true } : {}) })
      const anchorMs = bench.anchorFor(anchors, c)
      rows.push({ config: c, m, anchorMs })
      const vs = anchorMs !== undefined ? `  ${(anchorMs / m.ms).toFixed(3)}x vs FlashMLA` : ''
      const vd = m.defaultMs != null ? `  ${(m.ms / m.defaultMs).toFixed(3)}x the default plan's time` : ''
      progress.log(
        `[${String(i + 1).padStart(w)}/${configs.length}] ${c.label}  ${fmt.ms(m.ms)} ms  ${fmt.gbps(m.gbps)} GB/s  ${fmt.tflops(m.tflops)} TFLOPS${vs}${vd}`,
      )
    }
  } finally {
    progress.end()
    process.removeListener('SIGINT', onSigint)
  }

  console.log('')
  console.log(table(rows, ceiling, anchors.size > 0))
  console.log('')
  console.log(
    `copy ceiling ${ceiling.toFixed(0)} GB/s; best ${fmt.gbps(Math.max(...rows.map((r) => r.m.gbps)))} GB/s (${((100 * Math.max(...rows.map((r) => r.m.gbps))) / ceiling).toFixed(1)}% of the ceiling), best ${fmt.tflops(Math.max(...rows.map((r) => r.m.tflops)))} TFLOPS`,
  )
  if (anchors.size > 0) {
    const sp = (pred: (r: Row) => boolean) => rows.filter((r) => r.anchorMs !== undefined && pred(r)).map((r) => r.anchorMs! / r.m.ms)
    const groups: [string, number[]][] = [
      ['grid', sp((r) => r.config.tag === 'grid')],
      ['beyond', sp((r) => r.config.tag !== 'grid')],
      ['all', sp(() => true)],
    ]
    let any = false
    for (const [name, xs] of groups) {
      const g = geomean(xs)
      if (g === undefined) continue
      any = true
      const slower = xs.filter((x) => x < 1).length
      console.log(
        `${name}: geometric mean speed-up vs FlashMLA anchors ${g.toFixed(3)}x over ${xs.length} configurations (${slower} slower)`,
      )
    }
    if (!any) console.log('no configuration of this run has an anchor (anchors apply to FlashMLA shapes only: the flashmla suite)')
  }
  if (invariant) {
    for (const [name, pred] of [
      ['grid', (r: Row) => r.config.tag === 'grid'],
      ['beyond', (r: Row) => r.config.tag !== 'grid'],
      ['all', () => true],
    ] as const) {
      const xs = rows.filter((r) => r.m.defaultMs != null && pred(r)).map((r) => r.m.ms / r.m.defaultMs!)
      const g = geomean(xs)
      if (g !== undefined)
        console.log(
          `${name}: batch-invariant / default plan time, geometric mean ${g.toFixed(3)}x over ${xs.length} configurations (worst ${Math.max(...xs).toFixed(3)}x)`,
        )
    }
  }
  const files = writeOutputs()
  const shown = (f: string) => {
    const r = path.relative(process.cwd(), f)
    return r && !r.startsWith('..') ? r : f
  }
  console.log(`wrote ${files.map(shown).join(', ')}`)
  return 0
}
