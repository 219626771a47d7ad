/** `mla-decode bench --devices all|LIST`: the same configurations on several GPUs at once; per GPU, total, scaling. */

import * as fs from 'node:fs'
import * as path from 'node:path'
import { Device, bench, type HalfDType } from '../../../index'
import { UsageError, positiveInt, version } from '../args'
import { Progress } from '../progress'
import { fmt } from '../report'

/** The CSV header of `bench-multi.csv` (the Rust `gpu_bench --devices` columns). */
export const MULTI_CSV_HEADER = 'tag,b,s_q,mean_sk,h_q,varlen,device,ms,gbps,tflops,scaling'

/** Checks the form of a `--devices` value: `all` or distinct ordinals `0,1,...` (a usage error otherwise). */
export function parseDevicesFlag(spec: string): 'all' | number[] {
  if (spec === 'all') return 'all'
  if (!/^\d{1,4}(,\d{1,4})*$/.test(spec)) throw new UsageError(`--devices: expected all or a list of CUDA ordinals like 0,1, got '${spec}'`)
  const v = spec.split(',').map(Number)
  if (new Set(v).size !== v.length) throw new UsageError(`--devices: an ordinal is listed twice in '${spec}'`)
  return v
}

export interface MultiValues {
  devices: string
  quick: boolean
  suite?: string
  tiny: boolean
  reps?: string
  dtype: string
  filter: string
  out: string
  'no-progress': boolean
}

export async function cmdBenchMulti(values: MultiValues): Promise<number> {
  parseDevicesFlag(values.devices)
  const reps = positiveInt('reps', values.reps) ?? 30
  const dtype = values.dtype
  if (dtype !== 'bf16' && dtype !== 'fp16') throw new UsageError(`--dtype: expected bf16 or fp16, got '${dtype}'`)
  const suite = (values.tiny ? 'tiny' : (values.suite ?? 'flashmla')) as bench.Suite
  if (!['flashmla', 'cpu', 'tiny'].includes(suite)) throw new UsageError(`--suite: expected flashmla or cpu, got '${suite}'`)
  const all = bench.configs(suite, { quick: values.quick })
  const configs = all.filter((c) => c.label.startsWith(values.filter))
  if (configs.length === 0)
    throw new UsageError(
      `--filter: no configuration of the ${suite} suite starts with '${values.filter}'; labels: ${all
        .slice(0, 6)
        .map((c) => c.label)
        .join(', ')}, ...`,
    )
  // Typed errors from here on: no usable GPU (never the CPU backend), a device that cannot be opened.
  const ordinals = bench.resolveDevices(values.devices)
  const devs: Device[] = []
  try {
    for (const o of ordinals) devs.push(Device.open(`cuda:${o}`))
    console.log(`mla-decode ${version()} bench --devices ${values.devices}: ${devs.length} GPU(s) at once`)
    for (const d of devs) console.log(`  cuda:${d.info.ordinal}: ${d.info.name} (${d.info.multiprocessors} SMs)`)
    console.log(
      `suite ${suite}${values.quick ? ' (quick)' : ''}: ${configs.length} configurations, ${dtype}, causal, median of ${reps} steps per GPU; ` +
        `total = bytes of every GPU's steps / wall span (barrier to the last GPU done), scaling = total / cuda:${ordinals[0]} alone`,
    )
    const outDir = path.resolve(values.out)
    fs.mkdirSync(outDir, { recursive: true })
    const live = process.stderr.isTTY === true && !values['no-progress'] && !process.env.CI
    const progress = new Progress(configs.length, live)
    const lines: string[] = [MULTI_CSV_HEADER]
    const table: string[][] = [['label', 'device', 'ms', 'GB/s', 'TFLOPS', 'scaling']]
    const w = String(configs.length).length
    try {
      for (const [i, c] of configs.entries()) {
        progress.begin(c.label, i)
        const m = await bench.runMulti(devs, c, { reps, dtype: dtype as HalfDType })
        const key = [c.tag, c.b, c.sQ, c.mean, c.hQ, c.varlen ? 1 : 0].join(',')
        const row = (device: string, ms: number, gbps: number, tflops: number, scaling?: number) => {
          table.push([
            c.label,
            device,
            fmt.ms(ms),
            fmt.gbps(gbps),
            fmt.tflops(tflops),
            scaling === undefined ? '' : `${scaling.toFixed(3)}x`,
          ])
          lines.push(
            `${key},${device},${ms.toFixed(5)},${gbps.toFixed(1)},${tflops.toFixed(2)},${scaling === undefined ? '' : scaling.toFixed(4)}`,
          )
        }
        row(`alone:${m.alone.ordinal}`, m.alone.ms, m.alone.gbps, m.alone.tflops)
        for (const d of m.devices) row(String(d.ordinal), d.ms, d.gbps, d.tflops)
        row('total', m.wallMs / m.reps, m.gbps, m.tflops, m.scaling)
        progress.log(
          `[${String(i + 1).padStart(w)}/${configs.length}] ${c.label}  ${m.devices.length} GPU(s) at once ${fmt.gbps(m.gbps)} GB/s in total = ${m.scaling.toFixed(3)}x cuda:${m.alone.ordinal} alone (${fmt.gbps(m.aloneGbps)} GB/s)  ` +
            m.devices.map((d) => `cuda:${d.ordinal} ${fmt.ms(d.ms)} ms ${fmt.gbps(d.gbps)} GB/s`).join('  '),
        )
      }
    } finally {
      progress.end()
    }
    const widths = table[0]!.map((_, j) => Math.max(...table.map((r) => r[j]!.length)))
    console.log('')
    for (const r of table) console.log(r.map((x, j) => (j < 2 ? x.padEnd(widths[j]!) : x.padStart(widths[j]!))).join('  '))
    const csvPath = path.join(outDir, 'bench-multi.csv')
    fs.writeFileSync(csvPath, lines.join('\n') + '\n')
    console.log(`wrote ${path.relative(process.cwd(), csvPath) || csvPath}`)
    return 0
  } finally {
    for (const d of devs) d.dispose()
  }
}
