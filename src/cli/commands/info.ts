/** `mla-decode info`: GPU status and the device that would run. */

import { parseArgs } from 'node:util'
import { bench, gpuStatus } from '../../../index'
import { openDevice, version } from '../args'
import { HELP } from '../help'

export function cmdInfo(argv: string[]): number {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: { device: { type: 'string', default: 'auto' }, help: { type: 'boolean', short: 'h', default: false } },
  })
  if (values.help) {
    console.log(HELP)
    return 0
  }
  const s = gpuStatus()
  console.log(`mla-decode ${version()} (node ${process.version}, ${process.platform}-${process.arch})`)
  console.log(
    `gpu: ${s.available ? 'available' : 'unavailable'}; ${s.deviceCount} CUDA device(s); kernels ${s.kernelsBuilt ? 'built' : 'not built'}${s.reason ? `; ${s.reason}` : ''}`,
  )
  console.log(`driver: ${s.driverVersion ? `CUDA ${s.driverVersion.join('.')}` : 'none'}; kernels: ${s.kernelsCompiler ?? 'none'}`)
  console.log(`kernel targets: ${s.kernelTargets.length ? s.kernelTargets.join(', ') : 'none'}`)
  for (const d of s.devices) {
    const how = d.kernelPath ? `kernel path ${d.kernelPath} (${d.kernelTarget})` : `cannot be opened: ${d.reason ?? 'unknown'}`
    console.log(`  cuda:${d.ordinal} ${d.name}, compute capability ${d.computeCapability.join('.')}: ${how}`)
  }
  using dev = openDevice(values.device)
  const i = dev.info
  console.log(`device (${values.device}): ${i.name}`)
  console.log(
    `  kind ${i.kind}, ordinal ${i.ordinal}${i.kind === 'cuda' ? `, compute capability ${i.computeCapability.join('.')}, kernel path ${i.kernelPath}, ${i.multiprocessors} SMs, ${(i.totalMemory / 2 ** 30).toFixed(1)} GiB` : `, ${i.multiprocessors} threads`}`,
  )
  console.log(`  bench suite: ${bench.defaultSuite(dev)} (${bench.configs(bench.defaultSuite(dev)).length} configurations)`)
  return 0
}
