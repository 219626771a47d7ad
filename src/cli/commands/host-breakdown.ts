/** `mla-decode bench --host-breakdown`: where the host time of one call goes; host-breakdown.csv. */

import * as fs from 'node:fs'
import * as path from 'node:path'
import { bench } from '../../../index'
import { openDevice, positiveInt, version } from '../args'
import { hostBreakdownCsv } from '../report'

export async function cmdBenchHostBreakdown(values: { device: string; quick: boolean; out: string; steps?: string }): Promise<number> {
  const calls = positiveInt('steps', values.steps)
  using dev = openDevice(values.device)
  const seen = new Set<string>()
  const configs = bench.hostConfigs(dev, { quick: values.quick }).filter((c) => {
    const k = `${c.b}/${c.hQ}/${c.sQ}/${c.length}`
    return !seen.has(k) && (seen.add(k), true)
  })
  const outDir = path.resolve(values.out)
  fs.mkdirSync(outDir, { recursive: true })
  console.log(
    `mla-decode ${version()} bench --host-breakdown: ${dev.info.name} (${dev.kind}); ${configs.length} shapes, median of ${calls ?? (dev.kind === 'cuda' ? 200 : 20)} calls per mode`,
  )
  const all: bench.HostPhase[] = []
  for (const c of configs) {
    const { phases, info } = await bench.runHostBreakdown(dev, { ...c, layers: 1 }, calls ? { calls } : {})
    console.log(`\nb=${c.b} h_q=${c.hQ} s_q=${c.sQ} len=${c.length} (${info})`)
    let mode = ''
    for (const p of phases) {
      if (p.mode !== mode) {
        mode = p.mode
        const total = phases.filter((x) => x.mode === mode && !x.mode.startsWith('stub')).reduce((a, x) => a + x.us, 0)
        console.log(`  ${mode}${mode.startsWith('stub') ? '' : ` (sum of medians ${total.toFixed(1)} us)`}`)
      }
      console.log(`    ${p.us.toFixed(2).padStart(9)} us  ${p.phase}${p.n < (calls ?? 0) ? `  (${p.n} calls)` : ''}`)
    }
    all.push(...phases)
  }
  const file = path.join(outDir, 'host-breakdown.csv')
  fs.writeFileSync(file, hostBreakdownCsv(all))
  console.log(`wrote ${file}`)
  return 0
}
