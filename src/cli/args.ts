/** What the commands share in parsing their arguments: usage errors, the device flag, counts, the version. */

import * as fs from 'node:fs'
import * as path from 'node:path'
import { Device, type DeviceSpec } from '../../index'

/** A usage error: the message, a hint to --help, exit status 2. */
export class UsageError extends Error {}

/** The package's version (its package.json is three levels above dist/src/cli/). */
export function version(): string {
  try {
    return (JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', '..', 'package.json'), 'utf8')) as { version: string }).version
  } catch {
    return 'unknown'
  }
}

export function openDevice(spec: string): Device {
  if (!/^(auto|cpu|cuda(:\d+)?)$/.test(spec)) throw new UsageError(`--device: expected auto, cpu, cuda or cuda:<n>, got '${spec}'`)
  return Device.open(spec as DeviceSpec)
}

export function positiveInt(name: string, s: string | undefined): number | undefined {
  if (s === undefined) return undefined
  const n = Number(s)
  if (!Number.isInteger(n) || n < 1) throw new UsageError(`--${name}: expected a positive integer, got '${s}'`)
  return n
}
