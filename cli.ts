#!/usr/bin/env node
/**
 * The `mla-decode` command (package bin, compiled to dist/cli.js):
 *
 *   mla-decode bench [options]   FlashMLA's benchmark grid and beyond-grid shapes, with the
 *                                copy ceiling of the same run; a table, bench.csv, bench.svg
 *   mla-decode bench --host      the host benchmark: decode steps driven from TypeScript
 *                                (await, sync, enqueue, graph) vs the kernels' own time;
 *                                host.csv, host-ops.csv
 *   mla-decode bench --host-breakdown   where the host time of one call goes (phases of
 *                                an awaited decode, an enqueued step, appendBatch);
 *                                host-breakdown.csv
 *   mla-decode info [--device]   GPU status and device facts
 *   mla-decode --help
 *
 * Everything it measures comes from the package's `bench` API (the Rust core's
 * `mla_core::bench`); this file only parses flags, shows progress and writes files.
 */

import * as fs from 'node:fs'
import * as path from 'node:path'
import { parseArgs } from 'node:util'
import { Device, MlaError, bench, gpuStatus, type DeviceSpec, type HalfDType } from './index'

const HELP = `mla-decode: MLA decoding (FlashMLA-compatible) for Node.js

Usage:
  mla-decode bench [options]   run the benchmark; print a table, write CSV + SVG
  mla-decode bench --host      the host benchmark (see below); write host.csv, host-ops.csv
  mla-decode bench --host-breakdown
                               phases of one call of each host-path mode (see below);
                               write host-breakdown.csv
  mla-decode info [--device D] GPU status and the device that would run
  mla-decode --help            this text

bench options:
  --device auto|cpu|cuda[:n]   device (default auto: CUDA device 0 if usable, else CPU)
  --quick                      fewer configurations: FlashMLA's grid at mean length 4096
                               only (plus the beyond-grid shapes); on the CPU backend,
                               mean 1024 only and no multi-token shapes
  --suite flashmla|cpu         which configurations (default: flashmla on CUDA, cpu on
                               the CPU backend). flashmla: FlashMLA's grid (b=128, mean
                               length 4096/8192/16384, h_q 16/32/64/128, s_q 1/2, fixed
                               and variable lengths) then short contexts, an imbalanced
                               batch and multi-token prediction. cpu: a reduced grid
                               (b=8, means 1024/4096, h_q 16/128, s_q 1/2, fixed and
                               variable lengths, the imbalanced batch, multi-token at
                               b=8): the b=128 grid takes far too long on a few
                               CPU cores (half an hour or more on 2 cores).
  --reps N                     timed runs per configuration, median reported
                               (default 30 on CUDA, 5 on the CPU backend)
  --dtype bf16|fp16            element type (default bf16, as FlashMLA's grid)
  --filter PREFIX              only labels starting with PREFIX (tag/s_q/mean/h_q/varlen,
                               e.g. grid/1/4096 or mtp)
  --anchors FILE[,FILE]        FlashMLA anchor CSVs (in the repository:
                               bench/anchors/flashmla-h200.csv): adds anchor ms and
                               speed-up columns and the geometric mean of the speed-ups
  --matmul-tflops T            a matmul ceiling for the floor_ms column (default: none,
                               the floor is then bytes at the copy ceiling)
  --out DIR                    output directory (default ./bench-out): bench.csv, bench.svg
  --batch-invariant            measure batch-invariant plans (a sequence's output bit for
                               bit the same whatever else is in the batch), and the default
                               plan on the same inputs: adds default_ms and vs_default
                               (invariant time / default time) and their geometric mean
  --no-progress                no in-place progress bar (also off when stderr is no TTY)

bench --host options (--device, --out, --quick as above):
  --steps N                    timed steps per mode (default 200 on CUDA, 10 on the CPU)
  --modes LIST                 comma-separated subset of await,sync,enqueue,graph
  Shapes: on CUDA b=1 h_q=16 1024 tokens, b=128 h_q=16 and 128 4096 tokens, 1 and 8
  layers per step; on the CPU backend small shapes (--quick: the smallest). Per mode, the
  median wall time of a step (plan.update + the layers' decodes, and the wait) divided by
  the layers, next to the kernels' own time per layer (CUDA events around work queued
  behind a long fill, so launch gaps are not counted):
    host.csv      b,h_q,s_q,length,layers,mode,kernel_us,step_us
    host-ops.csv  b,h_q,s_q,length,op,us   (append-loop, appendBatch, appendBatch-device,
                  appendBatch-f32, batch, batchInto, plan, plan.update: host time of one
                  call)

bench --host-breakdown options (--device, --out, --quick, --steps as --host's; --steps is
the calls per mode, default 200 on CUDA, 20 on the CPU):
  For each shape of --host (one layer), the median gap between consecutive phase marks of
  one call (js:* in index.ts, native:* in the binding, the rest in the core, all on
  CLOCK_MONOTONIC) for: await (completion polled from the event loop), await-pool (the
  wait on the libuv pool, MLA_AWAIT_SPIN_US=0), enqueue (plan.update + decodeInto +
  synchronizeSync), appendBatch (host bits), appendBatch-device, appendBatch-f32; and the
  two completion paths around a stand-in wait of 30 and 500 us (stub-pool, stub-poll: the
  latency from the wait's end to the JS continuation, no GPU work).
    host-breakdown.csv  b,h_q,s_q,length,mode,phase,us,n

Timing: median of CUDA-event-timed runs after warm-up (wall clock on the CPU backend).
GB/s = (sum(seqlens)*576 + b*s_q*h_q*576 + b*s_q*h_q*512) * 2 bytes / time;
TFLOPS = 2 * s_q * sum(seqlens) * h_q * (576 + 512) / time. The copy ceiling (1 GiB
device-to-device on CUDA, 256 MiB host copy on the CPU) is measured in the same run;
compare ratios to it, not raw times across machines.

Kernels: Hopper (sm_90) runs its own; Ampere, Ada and Blackwell (compute capability 8.0+)
the portable ones, from a cubin of their architecture or the compute_80 PTX (\`info\`
prints which). MLA_FORCE_PORTABLE=1 runs the portable kernels on Hopper too.

Exit status: 0 done, 1 a failure (device, measurement, files), 2 a usage error.`

const CSV_HEADER = 'tag,b,s_q,mean_sk,h_q,varlen,ms,gbps,tflops,pct_copy_ceiling,floor_ms,anchor_ms,speedup'

class UsageError extends Error {}

export interface Row {
  config: bench.Config
  m: bench.Measurement
  anchorMs: number | undefined
}

function version(): string {
  try {
    return (JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'package.json'), 'utf8')) as { version: string }).version
  } catch {
    return 'unknown'
  }
}

function openDevice(spec: string): Device {
  if (!/^(auto|cpu|cuda(:\d+)?)$/.test(spec)) throw new UsageError(`--device: expected auto, cpu, cuda or cuda:<n>, got '${spec}'`)
  return Device.open(spec as DeviceSpec)
}

function positiveInt(name: string, s: string | undefined): number | undefined {
  if (s === undefined) return undefined
  const n = Number(s)
  if (!Number.isInteger(n) || n < 1) throw new UsageError(`--${name}: expected a positive integer, got '${s}'`)
  return n
}

// ---------------------------------------------------------------------------------------
// Formatting

const fmt = {
  ms: (x: number) => (x >= 100 ? x.toFixed(1) : x >= 10 ? x.toFixed(2) : x >= 1 ? x.toFixed(3) : x.toFixed(4)),
  gbps: (x: number) => (x >= 100 ? x.toFixed(0) : x.toFixed(1)),
  tflops: (x: number) => (x >= 10 ? x.toFixed(1) : x >= 0.1 ? x.toFixed(2) : x.toFixed(3)),
}

function clock(ms: number): string {
  const s = Math.round(ms / 1000)
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`
}

function geomean(xs: number[]): number | undefined {
  if (xs.length === 0) return undefined
  return Math.exp(xs.reduce((a, x) => a + Math.log(x), 0) / xs.length)
}

function table(rows: Row[], ceiling: number, withAnchors: boolean): string {
  const withDefault = rows.some((r) => r.m.defaultMs != null)
  const head = ['label', 'b', 'ms', 'GB/s', 'TFLOPS', '%copy', ...(withAnchors ? ['anchor ms', 'speedup'] : []), ...(withDefault ? ['default ms', 'vs default'] : [])]
  const body = rows.map((r) => [
    r.config.label,
    String(r.m.b),
    fmt.ms(r.m.ms),
    fmt.gbps(r.m.gbps),
    fmt.tflops(r.m.tflops),
    `${((100 * r.m.gbps) / ceiling).toFixed(1)}%`,
    ...(withAnchors ? [r.anchorMs !== undefined ? fmt.ms(r.anchorMs) : '-', r.anchorMs !== undefined ? `${(r.anchorMs / r.m.ms).toFixed(3)}x` : '-'] : []),
    ...(withDefault ? (r.m.defaultMs != null ? [fmt.ms(r.m.defaultMs), `${(r.m.ms / r.m.defaultMs).toFixed(3)}x`] : ['-', '-']) : []),
  ])
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((row) => row[i]!.length)))
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ')
  return [line(head), widths.map((w) => '-'.repeat(w)).join('  '), ...body.map(line)].join('\n')
}

/** Six significant digits, no exponent for the magnitudes a benchmark produces. */
function sig(x: number): string {
  return String(Number(x.toPrecision(6)))
}

function csv(rows: Row[], ceiling: number, matmulTflops: number): string {
  // Batch-invariant runs: two more columns, the default plan's time and the ratio.
  const withDefault = rows.some((r) => r.m.defaultMs != null)
  const lines = rows.map(({ config: c, m, anchorMs }) => {
    // The floor: bytes at the copy ceiling or FLOPs at the matmul ceiling, the larger.
    const floorMs = Math.max(m.bytes / (ceiling * 1e9), Number.isFinite(matmulTflops) ? m.flops / (matmulTflops * 1e12) : 0) * 1e3
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

// ---------------------------------------------------------------------------------------
// SVG chart (hand-written): two horizontal bar panels, GB/s (with the copy ceiling) and
// TFLOPS, one row per configuration.

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;')
}

/** Tick step of about `max / 5`: 1, 2 or 5 times a power of ten. */
function niceStep(max: number): number {
  const raw = max / 5
  const p = 10 ** Math.floor(Math.log10(raw))
  return [1, 2, 5, 10].map((k) => k * p).find((s) => s >= raw) ?? 10 * p
}

function tagColor(c: bench.Config): string {
  switch (c.tag) {
    case 'grid':
      return c.varlen ? '#7fa8d1' : '#3b6ea5'
    case 'short':
      return '#e8912d'
    case 'imbalanced':
      return '#c94c4c'
    case 'mtp':
      return '#4f9a55'
    default:
      return '#8a6fb0'
  }
}

export function svgChart(rows: Row[], ceiling: number, title: { device: string; date: string; suite: string; dtype: string; reps: number }): string {
  const n = rows.length
  const rowH = 18
  const barH = 12
  const labelW = 170
  const msW = 96 // the ms column, between the labels and the GB/s panel
  const panelW = 430
  const gap = 70
  const left = 16
  const top = 136
  const x0a = left + labelW + msW // GB/s panel origin
  const x0b = x0a + panelW + gap // TFLOPS panel origin
  const width = x0b + panelW + 40
  const plotH = Math.max(1, n) * rowH
  const height = top + plotH + 74
  const withAnchors = rows.some((r) => r.anchorMs !== undefined)

  const maxG = Math.max(ceiling, ...rows.map((r) => r.m.gbps), ...rows.map((r) => (r.anchorMs ? r.m.bytes / (r.anchorMs * 1e-3) / 1e9 : 0))) * 1.08
  const maxT = Math.max(1e-9, ...rows.map((r) => r.m.tflops), ...rows.map((r) => (r.anchorMs ? r.m.flops / (r.anchorMs * 1e-3) / 1e12 : 0))) * 1.12
  const stepG = niceStep(maxG)
  const stepT = niceStep(maxT)
  const domG = Math.ceil(maxG / stepG) * stepG
  const domT = Math.ceil(maxT / stepT) * stepT
  const sx = (v: number, dom: number) => (v / dom) * panelW
  const num = (v: number) => (Math.round(v * 10) / 10).toString()
  const tickLabel = (v: number, step: number) => (step >= 1 ? v.toFixed(0) : v.toFixed(Math.min(4, Math.ceil(-Math.log10(step)))))

  const o: string[] = []
  o.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="Helvetica, Arial, sans-serif" font-size="12">`)
  o.push(`<rect class="background" x="0" y="0" width="${width}" height="${height}" fill="#ffffff"/>`)
  o.push(`<text x="${left}" y="26" font-size="17" font-weight="bold">mla-decode bench: ${esc(title.device)}</text>`)
  o.push(
    `<text x="${left}" y="46" fill="#444">${esc(title.date)} · ${esc(title.suite)} suite · ${esc(title.dtype)}, causal · median of ${title.reps} runs · copy ceiling ${ceiling.toFixed(0)} GB/s (read + write)</text>`,
  )
  // Legend
  const legend: [string, string][] = [
    ['grid, fixed lengths', '#3b6ea5'],
    ['grid, variable lengths', '#7fa8d1'],
    ['short', '#e8912d'],
    ['imbalanced', '#c94c4c'],
    ['mtp', '#4f9a55'],
  ]
  const present = new Set(rows.map((r) => (r.config.tag === 'grid' ? (r.config.varlen ? 'grid, variable lengths' : 'grid, fixed lengths') : r.config.tag)))
  let lx = left
  for (const [name, color] of legend.filter(([nm]) => present.has(nm))) {
    o.push(`<rect class="legend" x="${lx}" y="57" width="10" height="10" fill="${color}"/><text x="${lx + 14}" y="66" font-size="11">${esc(name)}</text>`)
    lx += 24 + name.length * 6.2
  }
  if (withAnchors) {
    o.push(`<line x1="${lx}" y1="56" x2="${lx}" y2="68" stroke="#111" stroke-width="2"/><text x="${lx + 6}" y="66" font-size="11">FlashMLA (anchor)</text>`)
  }
  // What a row label means, and what the ms column holds.
  const mono = (x: string) => `<tspan font-family="Menlo, Consolas, monospace">${x}</tspan>`
  for (const [i, line] of [
    `rows: ${mono('tag/s_q/mean/h_q/varlen')}, e.g. ${mono('grid/1/4096/16/0')}. tag: grid (FlashMLA's grid), or short, imbalanced, mtp (beyond it); s_q: query tokens per sequence;`,
    "mean: mean cache length (0: the imbalanced batch's own lengths); h_q: query heads; varlen: 1 = lengths drawn from Normal(mean, mean/2), 0 = all equal to the mean.",
    `ms: median time of one decode${withAnchors ? " (FlashMLA's time in brackets)" : ''}; bars: GB/s and TFLOPS of that time.`,
  ].entries()) {
    o.push(`<text class="legend-labels" x="${left}" y="${84 + 14 * i}" font-size="11" fill="#333">${line}</text>`)
  }
  o.push(`<text x="${x0a - 8}" y="${top - 8}" text-anchor="end" font-weight="bold">ms</text>`)
  for (const [x0, name, dom, step] of [
    [x0a, 'GB/s', domG, stepG],
    [x0b, 'TFLOPS', domT, stepT],
  ] as const) {
    o.push(`<text x="${x0 + panelW / 2}" y="${top - 8}" text-anchor="middle" font-weight="bold">${name}</text>`)
    for (let v = 0; v <= dom + step * 1e-9; v += step) {
      const x = x0 + sx(v, dom)
      o.push(`<line x1="${num(x)}" y1="${top}" x2="${num(x)}" y2="${top + plotH}" stroke="#e2e2e2"/>`)
      o.push(`<text x="${num(x)}" y="${top + plotH + 16}" text-anchor="middle" font-size="10" fill="#555">${tickLabel(v, step)}</text>`)
    }
    o.push(`<line x1="${x0}" y1="${top}" x2="${x0}" y2="${top + plotH}" stroke="#888"/>`)
    o.push(`<text x="${x0 + panelW / 2}" y="${top + plotH + 34}" text-anchor="middle" fill="#333">${name}</text>`)
  }

  rows.forEach((r, i) => {
    const y = top + i * rowH
    const yb = y + (rowH - barH) / 2
    if (i % 2 === 1) o.push(`<rect class="zebra" x="${left}" y="${y}" width="${width - left - 20}" height="${rowH}" fill="#f6f7f9"/>`)
    o.push(`<text x="${x0a - msW - 8}" y="${y + rowH / 2 + 4}" text-anchor="end" font-family="Menlo, Consolas, monospace" font-size="11">${esc(r.config.label)}</text>`)
    const msText = fmt.ms(r.m.ms) + (r.anchorMs !== undefined ? ` (${fmt.ms(r.anchorMs)})` : '')
    o.push(`<text class="ms" x="${x0a - 8}" y="${y + rowH / 2 + 4}" text-anchor="end" font-size="11">${esc(msText)}</text>`)
    const color = tagColor(r.config)
    // FlashMLA's time on the same shape, as a rate: a black marker on the bar's row.
    const anchorRate = (work: number, scale: number) => (r.anchorMs !== undefined ? work / (r.anchorMs * 1e-3) / scale : undefined)
    for (const [x0, v, av, dom, unit, cls, digits] of [
      [x0a, r.m.gbps, anchorRate(r.m.bytes, 1e9), domG, 'GB/s', 'gbps', r.m.gbps >= 100 ? 0 : 1],
      [x0b, r.m.tflops, anchorRate(r.m.flops, 1e12), domT, 'TFLOPS', 'tflops', r.m.tflops >= 10 ? 1 : r.m.tflops >= 0.1 ? 2 : 3],
    ] as const) {
      const w = Math.max(0.5, sx(v, dom))
      const tip = `${r.config.label} (b=${r.m.b}): ${v.toFixed(digits)} ${unit}, ${fmt.ms(r.m.ms)} ms`
      o.push(`<rect class="bar ${cls}" x="${x0}" y="${num(yb)}" width="${num(w)}" height="${barH}" fill="${color}"><title>${esc(tip)}</title></rect>`)
      const ax = av !== undefined ? sx(av, dom) : 0
      const inside = Math.max(w, ax) > panelW - 44
      const tx = inside ? x0 + Math.min(w, ax > w ? ax - 4 : w) - 4 : x0 + Math.max(w, ax + 1) + 4
      o.push(`<text x="${num(tx)}" y="${num(yb + barH - 2)}" font-size="10" ${inside ? 'text-anchor="end" fill="#fff"' : 'fill="#222"'}>${v.toFixed(digits)}</text>`)
      if (av !== undefined) {
        const x = num(x0 + ax)
        o.push(`<line class="anchor" x1="${x}" y1="${y + 1}" x2="${x}" y2="${y + rowH - 1}" stroke="#111" stroke-width="2"><title>FlashMLA: ${fmt.ms(r.anchorMs!)} ms, ${av.toFixed(digits)} ${unit}</title></line>`)
      }
    }
  })

  // The copy ceiling: a vertical line across the GB/s panel.
  const cx = num(x0a + sx(ceiling, domG))
  o.push(`<line class="ceiling" x1="${cx}" y1="${top - 4}" x2="${cx}" y2="${top + plotH}" stroke="#d62728" stroke-width="1.5" stroke-dasharray="5,3"/>`)
  o.push(`<text x="${cx}" y="${top + plotH + 50}" text-anchor="middle" fill="#d62728" font-size="11">copy ceiling ${ceiling.toFixed(0)} GB/s</text>`)
  o.push('</svg>')
  return o.join('\n') + '\n'
}

// ---------------------------------------------------------------------------------------
// Progress: one line per configuration on stdout; on a TTY also an in-place bar on stderr.

class Progress {
  private timer: NodeJS.Timeout | undefined
  private current = ''
  private done = 0
  private started = Date.now()
  private configStarted = Date.now()
  constructor(
    private readonly total: number,
    private readonly live: boolean,
  ) {}

  begin(what: string, done: number): void {
    this.current = what
    this.done = done
    this.configStarted = Date.now()
    if (!this.live) return
    this.draw()
    this.timer ??= setInterval(() => this.draw(), 200)
    this.timer.unref()
  }

  private draw(): void {
    const cols = process.stderr.columns || 100
    const width = 24
    const filled = Math.round((width * this.done) / Math.max(1, this.total))
    const bar = '█'.repeat(filled) + '░'.repeat(width - filled)
    const now = Date.now()
    let line = `  ${bar} ${this.done}/${this.total}  ${this.current}  ${((now - this.configStarted) / 1000).toFixed(1)} s  (elapsed ${clock(now - this.started)})`
    if (line.length > cols - 1) line = line.slice(0, cols - 1)
    process.stderr.write(`\r\x1b[K${line}`)
  }

  /** Prints a line where the bar was (the next begin() or tick draws the bar again below it). */
  log(line: string): void {
    if (this.live) process.stderr.write('\r\x1b[K')
    process.stdout.write(line + '\n')
  }

  end(): void {
    if (this.timer) clearInterval(this.timer)
    this.timer = undefined
    if (this.live) process.stderr.write('\r\x1b[K')
  }
}

// ---------------------------------------------------------------------------------------
// Commands

async function cmdBench(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      device: { type: 'string', default: 'auto' },
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
  if (values['matmul-tflops'] !== undefined && !(matmul > 0)) throw new UsageError(`--matmul-tflops: expected a positive number, got '${values['matmul-tflops']}'`)
  let suiteOpt = values.suite
  if (values.tiny) suiteOpt = 'tiny'
  if (suiteOpt !== undefined && !['flashmla', 'cpu', 'tiny'].includes(suiteOpt)) throw new UsageError(`--suite: expected flashmla or cpu, got '${suiteOpt}'`)

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
    throw new UsageError(`--filter: no configuration of the ${suite} suite starts with '${values.filter}'; labels: ${all.slice(0, 6).join(', ')}, ...`)
  }
  const effReps = reps ?? (dev.kind === 'cuda' ? 30 : 5)
  const outDir = path.resolve(values.out)
  fs.mkdirSync(outDir, { recursive: true })

  console.log(`mla-decode ${version()} bench: ${info.name} (${dev.kind}${dev.kind === 'cuda' ? `:${info.ordinal}, ${info.multiprocessors} SMs` : ''})`)
  console.log(`suite ${suite}${values.quick ? ' (quick)' : ''}: ${configs.length} configurations, ${dtype}, causal, median of ${effReps} runs${anchors.size ? `, ${anchors.size} anchors` : ''}`)
  if (invariant) console.log('batch-invariant plans: ms is the invariant plan, default_ms the default plan on the same inputs (timed runs alternating)')
  if (suite === 'cpu') console.log('(CPU backend: a reduced grid at b=8; --suite flashmla runs FlashMLA\'s b=128 grid, far too slow on a few cores)')

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
    fs.writeFileSync(svgPath, svgChart(rows, ceiling, { device: info.name, date, suite: suite + (values.quick ? ' (quick)' : ''), dtype, reps: effReps }))
    return [csvPath, svgPath]
  }
  // Ctrl-C: keep what was measured.
  const onSigint = () => {
    progress.end()
    const files = writeOutputs()
    process.stderr.write(`\ninterrupted after ${rows.length}/${configs.length} configurations${files.length ? `; wrote ${files.join(', ')}` : ''}\n`)
    process.exit(130)
  }
  process.once('SIGINT', onSigint)

  try {
    progress.begin('copy ceiling', 0)
    ceiling = await bench.copyCeiling(dev)
    progress.log(`copy ceiling ${ceiling.toFixed(0)} GB/s (${dev.kind === 'cuda' ? '1 GiB device-to-device' : '256 MiB host copy'}, read + write)`)
    const w = String(configs.length).length
    for (const [i, c] of configs.entries()) {
      progress.begin(c.label, i)
      const m = await bench.run(dev, c, { reps: effReps, dtype: dtype as HalfDType, ...(invariant ? { batchInvariant: true } : {}) })
      const anchorMs = bench.anchorFor(anchors, c)
      rows.push({ config: c, m, anchorMs })
      const vs = anchorMs !== undefined ? `  ${(anchorMs / m.ms).toFixed(3)}x vs FlashMLA` : ''
      const vd = m.defaultMs != null ? `  ${(m.ms / m.defaultMs).toFixed(3)}x the default plan's time` : ''
      progress.log(`[${String(i + 1).padStart(w)}/${configs.length}] ${c.label}  ${fmt.ms(m.ms)} ms  ${fmt.gbps(m.gbps)} GB/s  ${fmt.tflops(m.tflops)} TFLOPS${vs}${vd}`)
    }
  } finally {
    progress.end()
    process.removeListener('SIGINT', onSigint)
  }

  console.log('')
  console.log(table(rows, ceiling, anchors.size > 0))
  console.log('')
  console.log(`copy ceiling ${ceiling.toFixed(0)} GB/s; best ${fmt.gbps(Math.max(...rows.map((r) => r.m.gbps)))} GB/s (${((100 * Math.max(...rows.map((r) => r.m.gbps))) / ceiling).toFixed(1)}% of the ceiling), best ${fmt.tflops(Math.max(...rows.map((r) => r.m.tflops)))} TFLOPS`)
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
      console.log(`${name}: geometric mean speed-up vs FlashMLA anchors ${g.toFixed(3)}x over ${xs.length} configurations (${slower} slower)`)
    }
    if (!any) console.log('no configuration of this run has an anchor (anchors apply to FlashMLA shapes only: the flashmla suite)')
  }
  if (invariant) {
    for (const [name, pred] of [['grid', (r: Row) => r.config.tag === 'grid'], ['beyond', (r: Row) => r.config.tag !== 'grid'], ['all', () => true]] as const) {
      const xs = rows.filter((r) => r.m.defaultMs != null && pred(r)).map((r) => r.m.ms / r.m.defaultMs!)
      const g = geomean(xs)
      if (g !== undefined) console.log(`${name}: batch-invariant / default plan time, geometric mean ${g.toFixed(3)}x over ${xs.length} configurations (worst ${Math.max(...xs).toFixed(3)}x)`)
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

export const HOST_CSV_HEADER = 'b,h_q,s_q,length,layers,mode,kernel_us,step_us'
export const HOST_OPS_CSV_HEADER = 'b,h_q,s_q,length,op,us'

export function hostCsv(rows: bench.HostRow[]): string {
  return [HOST_CSV_HEADER, ...rows.map((r) => [r.b, r.hQ, r.sQ, r.length, r.layers, r.mode, r.kernelUs.toFixed(2), r.stepUs.toFixed(2)].join(','))].join('\n') + '\n'
}

export function hostOpsCsv(ops: bench.HostOp[]): string {
  return [HOST_OPS_CSV_HEADER, ...ops.map((o) => [o.b, o.hQ, o.sQ, o.length, o.op, o.us.toFixed(2)].join(','))].join('\n') + '\n'
}

async function cmdBenchHost(values: { device: string; quick: boolean; out: string; steps?: string; modes?: string; 'no-progress': boolean }): Promise<number> {
  const steps = positiveInt('steps', values.steps)
  let modes: bench.HostMode[] | undefined
  if (values.modes !== undefined) {
    modes = values.modes.split(',').filter((m) => m.length > 0) as bench.HostMode[]
    const bad = modes.find((m) => !bench.HOST_MODES.includes(m))
    if (bad !== undefined || modes.length === 0) throw new UsageError(`--modes: expected a comma-separated subset of ${bench.HOST_MODES.join(',')}, got '${values.modes}'`)
  }
  using dev = openDevice(values.device)
  const info = dev.info
  const configs = bench.hostConfigs(dev, { quick: values.quick })
  const outDir = path.resolve(values.out)
  fs.mkdirSync(outDir, { recursive: true })
  console.log(`mla-decode ${version()} bench --host: ${info.name} (${dev.kind})`)
  console.log(`${configs.length} shapes, modes ${(modes ?? bench.HOST_MODES).join(',')}, median of ${steps ?? (dev.kind === 'cuda' ? 200 : 10)} steps; step_us = step wall time / layers`)
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
      progress.log(`[${i + 1}/${configs.length}] ${shape} layers=${c.layers}  kernel ${r.rows[0]?.kernelUs.toFixed(1) ?? '-'} us  ${cells}  (us per layer)`)
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

export const HOST_BREAKDOWN_CSV_HEADER = 'b,h_q,s_q,length,mode,phase,us,n'

export function hostBreakdownCsv(phases: bench.HostPhase[]): string {
  return [HOST_BREAKDOWN_CSV_HEADER, ...phases.map((p) => [p.b, p.hQ, p.sQ, p.length, p.mode, `"${p.phase}"`, p.us.toFixed(2), p.n].join(','))].join('\n') + '\n'
}

async function cmdBenchHostBreakdown(values: { device: string; quick: boolean; out: string; steps?: string }): Promise<number> {
  const calls = positiveInt('steps', values.steps)
  using dev = openDevice(values.device)
  const seen = new Set<string>()
  const configs = bench.hostConfigs(dev, { quick: values.quick }).filter((c) => {
    const k = `${c.b}/${c.hQ}/${c.sQ}/${c.length}`
    return !seen.has(k) && (seen.add(k), true)
  })
  const outDir = path.resolve(values.out)
  fs.mkdirSync(outDir, { recursive: true })
  console.log(`mla-decode ${version()} bench --host-breakdown: ${dev.info.name} (${dev.kind}); ${configs.length} shapes, median of ${calls ?? (dev.kind === 'cuda' ? 200 : 20)} calls per mode`)
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

function cmdInfo(argv: string[]): number {
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
  console.log(`gpu: ${s.available ? 'available' : 'unavailable'}; ${s.deviceCount} CUDA device(s); kernels ${s.kernelsBuilt ? 'built' : 'not built'}${s.reason ? `; ${s.reason}` : ''}`)
  console.log(`driver: ${s.driverVersion ? `CUDA ${s.driverVersion.join('.')}` : 'none'}; kernels: ${s.kernelsCompiler ?? 'none'}`)
  console.log(`kernel targets: ${s.kernelTargets.length ? s.kernelTargets.join(', ') : 'none'}`)
  for (const d of s.devices) {
    const how = d.kernelPath ? `kernel path ${d.kernelPath} (${d.kernelTarget})` : `cannot be opened: ${d.reason ?? 'unknown'}`
    console.log(`  cuda:${d.ordinal} ${d.name}, compute capability ${d.computeCapability.join('.')}: ${how}`)
  }
  using dev = openDevice(values.device)
  const i = dev.info
  console.log(`device (${values.device}): ${i.name}`)
  console.log(`  kind ${i.kind}, ordinal ${i.ordinal}${i.kind === 'cuda' ? `, compute capability ${i.computeCapability.join('.')}, kernel path ${i.kernelPath}, ${i.multiprocessors} SMs, ${(i.totalMemory / 2 ** 30).toFixed(1)} GiB` : `, ${i.multiprocessors} threads`}`)
  console.log(`  bench suite: ${bench.defaultSuite(dev)} (${bench.configs(bench.defaultSuite(dev)).length} configurations)`)
  return 0
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv
  switch (cmd) {
    case undefined:
    case '-h':
    case '--help':
    case 'help':
      console.log(HELP)
      return cmd === undefined ? 2 : 0
    case '-v':
    case '--version':
      console.log(version())
      return 0
    case 'bench':
      return cmdBench(rest)
    case 'info':
      return cmdInfo(rest)
    default:
      throw new UsageError(`unknown command '${cmd}' (expected bench, info or --help)`)
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code
    },
    (e: unknown) => {
      const usage = e instanceof UsageError || (e instanceof Error && (e as { code?: string }).code?.startsWith('ERR_PARSE_ARGS'))
      if (e instanceof MlaError) console.error(`mla-decode: ${e.code}: ${e.message}`)
      else console.error(`mla-decode: ${e instanceof Error ? e.message : String(e)}`)
      if (usage) console.error("run 'mla-decode --help' for the options")
      process.exitCode = usage ? 2 : 1
    },
  )
}
