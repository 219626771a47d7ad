import { KvCache } from './cache'
import { Device } from './device'
import { MlaError } from './errors'
import { Plan } from './plan'
import { Tensor } from './tensor'

// util.inspect / console.log: show what an object is (the handles' fields are native and
// would print as `Tensor { _n: Tensor {} }`). Set on the prototypes, not declared in the
// classes, so that the published .d.ts stays as it is.

type Inspect = (v: unknown, o: object) => string
function showAs<T extends object>(cls: { prototype: T; name: string }, fields: (x: T) => Record<string, unknown>): void {
  Object.defineProperty(cls.prototype, Symbol.for('nodejs.util.inspect.custom'), {
    value(this: T & { disposed: boolean }, _depth: number, options: object, inspect: Inspect): string {
      if (this.disposed) return `${cls.name} <disposed>`
      try {
        return `${cls.name} ${inspect(fields(this), options)}`
      } catch (e) {
        return `${cls.name} <${e instanceof MlaError ? e.code : 'error'}>`
      }
    },
  })
}
const deviceName = (d: Device): string => (d.kind === 'cuda' ? `cuda:${d.info.ordinal}` : 'cpu')
showAs(Device, (d) => {
  const i = d.info
  return d.kind === 'cuda'
    ? { kind: d.kind, ordinal: i.ordinal, name: i.name, computeCapability: i.computeCapability.join('.'), kernelPath: i.kernelPath, multiprocessors: i.multiprocessors }
    : { kind: d.kind, name: i.name }
})
showAs(Tensor, (t) => ({ shape: t.shape, dtype: t.dtype, device: deviceName(t.device), storage: t.storage, nbytes: t.nbytes }))
showAs(Plan, (p) => ({ batch: p.batch, rows: p.rows, numParts: p.numParts, batchInvariant: p.batchInvariant }))
showAs(KvCache, (c) => ({ numBlocks: c.numBlocks, freeBlocks: c.freeBlocks, dtype: c.dtype, sequences: c.sequences().length, device: deviceName(c.device) }))
