/** `mla-decode bench --host`: decode steps driven from TypeScript vs the kernels' own time; host.csv, host-ops.csv. */

import * as fs from 'node:fs'
import * as path from 'node:path'
import { bench } from '../../../index'
import { UsageError, openDevice, positiveInt, version } from '../args'
import { Progress } from '../progress'
import { hostCsv, hostOpsCsv } from '../report'

export async function cmdBenchHost(values: {
  device: string
  quick: boolean
  out: string
  steps?: string
  modes?: string
  'no-progress': boolean
}): Promise<number> {
  const steps = positiveInt('steps', values.steps)
  let modes: bench.HostMode[] | undefined
  if (values.modes !== undefined) {
    modes = values.modes.split(',').filter((m) => m.length > 0) as bench.HostMode[]
    const bad = modes.find((m) => !bench.HOST_MODES.includes(m))
    if (bad !== undefined || modes.length === 0)
      throw new UsageError(`--modes: expected a comma-separated subset of ${bench.HOST_MODES.join(',')}, got '${values.modes}'`)
  }
  using dev = openDevice(values.device)
  const info = dev.info
  const configs = bench.hostConfigs(dev, { quick: values.quick })
  const outDir = path.resolve(values.out)
  fs.mkdirSync(outDir, { recursive: true })
  console.log(`mla-decode ${version()} bench --host: ${info.name} (${dev.kind})`)
  console.log(
    `${configs.length} shapes, modes ${(modes ?? bench.HOST_MODES).join(',')}, median of ${steps ?? (dev.kind === 'cuda' ? 200 : 10)} steps; step_us = step wall time / layers`,
  )
  const live = process.stderr.isTTY === true && !values['no-progress'] && !process.env.CI
  const progress = new Progress(configs.length, live)
  const rows: bench.HostRow[] = []
  const ops: bench.HostOp[] = []
  const opsDone = new Set<string>()
  try {
    for (const [i, c] of configs.entries()) {
      const shape = `b=${c.b} h_q=${c.hQ} s_q=${c.sQ} len=${c.length}`
      progress.begin(`${shape} layers=${c.layers}`, i)
      const r = await bench.runHost(dev, c, { ...(modes ? { modes } : {}), ...(steps ? { steps } : {}), ops: !opsDone.has(shape) })
      opsDone.add(shape)
      rows.push(...r.rows)
      ops.push(...r.ops)
      const cells = r.rows.map((x) => `${x.mode} ${x.stepUs.toFixed(1)}`).join('  ')
      progress.log(
        `[${i + 1}/${configs.length}] ${shape} layers=${c.layers}  kernel ${r.rows[0]?.kernelUs.toFixed(1) ?? '-'} us  ${cells}  (us per layer)`,
      )
      for (const o of r.ops) progress.log(`    ${o.op.padEnd(20)} ${o.us.toFixed(1)} us`)
    }
  } finally {
    progress.end()
  }
  const csvPath = path.join(outDir, 'host.csv')
  const opsPath = path.join(outDir, 'host-ops.csv')
  fs.writeFileSync(csvPath, hostCsv(rows))
  fs.writeFileSync(opsPath, hostOpsCsv(ops))
  console.log(`wrote ${csvPath}, ${opsPath}`)
  return 0
}
