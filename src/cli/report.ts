/** The benchmark's results as text: number formats, the table, the CSV files. */

import { bench } from '../../index'
import { floorMs as floor } from '../bench'

export const CSV_HEADER = 'tag,b,s_q,mean_sk,h_q,varlen,ms,gbps,tflops,pct_copy_ceiling,floor_ms,anchor_ms,speedup'

export interface Row {
  config: bench.Config
  m: bench.Measurement
  anchorMs: number | undefined
}

// ---------------------------------------------------------------------------------------
// Formatting

export const fmt = {
  ms: (x: number) => (x >= 100 ? x.toFixed(1) : x >= 10 ? x.toFixed(2) : x >= 1 ? x.toFixed(3) : x.toFixed(4)),
  gbps: (x: number) => (x >= 100 ? x.toFixed(0) : x.toFixed(1)),
  tflops: (x: number) => (x >= 10 ? x.toFixed(1) : x >= 0.1 ? x.toFixed(2) : x.toFixed(3)),
}

export function geomean(xs: number[]): number | undefined {
  if (xs.length === 0) return undefined
  return Math.exp(xs.reduce((a, x) => a + Math.log(x), 0) / xs.length)
}

export function table(rows: Row[], ceiling: number, withAnchors: boolean): string {
  const withDefault = rows.some((r) => r.m.defaultMs != null)
  const head = [
    'label',
    'b',
    'ms',
    'GB/s',
    'TFLOPS',
    '%copy',
    ...(withAnchors ? ['anchor ms', 'speedup'] : []),
    ...(withDefault ? ['default ms', 'vs default'] : []),
  ]
  const body = rows.map((r) => [
    r.config.label,
    String(r.m.b),
    fmt.ms(r.m.ms),
    fmt.gbps(r.m.gbps),
    fmt.tflops(r.m.tflops),
    `${((100 * r.m.gbps) / ceiling).toFixed(1)}%`,
    ...(withAnchors
      ? [r.anchorMs !== undefined ? fmt.ms(r.anchorMs) : '-', r.anchorMs !== undefined ? `${(r.anchorMs / r.m.ms).toFixed(3)}x` : '-']
      : []),
    ...(withDefault ? (r.m.defaultMs != null ? [fmt.ms(r.m.defaultMs), `${(r.m.ms / r.m.defaultMs).toFixed(3)}x`] : ['-', '-']) : []),
  ])
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((row) => row[i]!.length)))
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ')
  return [line(head), widths.map((w) => '-'.repeat(w)).join('  '), ...body.map(line)].join('\n')
}

/** Six significant digits, no exponent for the magnitudes a benchmark produces. */
export function sig(x: number): string {
  return String(Number(x.toPrecision(6)))
}

export function csv(rows: Row[], ceiling: number, matmulTflops: number): string {
  // Batch-invariant runs: two more columns, the default plan's time and the ratio.
  const withDefault = rows.some((r) => r.m.defaultMs != null)
  const lines = rows.map(({ config: c, m, anchorMs }) => {
    // The floor: bytes at the copy ceiling or FLOPs at the matmul ceiling, the larger.
    const floorMs = floor(m.bytes, m.flops, ceiling, matmulTflops)
    return [
      c.tag,
      m.b,
      c.sQ,
      c.mean,
      c.hQ,
      c.varlen ? 1 : 0,
      m.ms.toFixed(5),
      sig(m.gbps),
      sig(m.tflops),
      sig((100 * m.gbps) / ceiling),
      floorMs.toFixed(5),
      anchorMs ?? '',
      anchorMs !== undefined ? (anchorMs / m.ms).toFixed(4) : '',
      ...(withDefault ? (m.defaultMs != null ? [m.defaultMs.toFixed(5), (m.ms / m.defaultMs).toFixed(4)] : ['', '']) : []),
    ].join(',')
  })
  return [CSV_HEADER + (withDefault ? ',default_ms,vs_default' : ''), ...lines].join('\n') + '\n'
}

export const HOST_CSV_HEADER = 'b,h_q,s_q,length,layers,mode,kernel_us,step_us'
export const HOST_OPS_CSV_HEADER = 'b,h_q,s_q,length,op,us'

export function hostCsv(rows: bench.HostRow[]): string {
  return (
    [
      HOST_CSV_HEADER,
      ...rows.map((r) => [r.b, r.hQ, r.sQ, r.length, r.layers, r.mode, r.kernelUs.toFixed(2), r.stepUs.toFixed(2)].join(',')),
    ].join('\n') + '\n'
  )
}

export function hostOpsCsv(ops: bench.HostOp[]): string {
  return [HOST_OPS_CSV_HEADER, ...ops.map((o) => [o.b, o.hQ, o.sQ, o.length, o.op, o.us.toFixed(2)].join(','))].join('\n') + '\n'
}

export const HOST_BREAKDOWN_CSV_HEADER = 'b,h_q,s_q,length,mode,phase,us,n'

export function hostBreakdownCsv(phases: bench.HostPhase[]): string {
  return (
    [
      HOST_BREAKDOWN_CSV_HEADER,
      ...phases.map((p) => [p.b, p.hQ, p.sQ, p.length, p.mode, `"${p.phase}"`, p.us.toFixed(2), p.n].join(',')),
    ].join('\n') + '\n'
  )
}
