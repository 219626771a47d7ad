/** The benchmark's SVG chart (bench.svg). */

import { bench } from '../../index'
import { gbps, tflops } from '../bench'
import { fmt, type Row } from './report'

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

export function svgChart(
  rows: Row[],
  ceiling: number,
  title: { device: string; date: string; suite: string; dtype: string; reps: number },
): string {
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

  const maxG = Math.max(ceiling, ...rows.map((r) => r.m.gbps), ...rows.map((r) => (r.anchorMs ? gbps(r.m.bytes, r.anchorMs) : 0))) * 1.08
  const maxT = Math.max(1e-9, ...rows.map((r) => r.m.tflops), ...rows.map((r) => (r.anchorMs ? tflops(r.m.flops, r.anchorMs) : 0))) * 1.12
  const stepG = niceStep(maxG)
  const stepT = niceStep(maxT)
  const domG = Math.ceil(maxG / stepG) * stepG
  const domT = Math.ceil(maxT / stepT) * stepT
  const sx = (v: number, dom: number) => (v / dom) * panelW
  const num = (v: number) => (Math.round(v * 10) / 10).toString()
  const tickLabel = (v: number, step: number) => (step >= 1 ? v.toFixed(0) : v.toFixed(Math.min(4, Math.ceil(-Math.log10(step)))))

  const o: string[] = []
  o.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="Helvetica, Arial, sans-serif" font-size="12">`,
  )
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
  const present = new Set(
    rows.map((r) => (r.config.tag === 'grid' ? (r.config.varlen ? 'grid, variable lengths' : 'grid, fixed lengths') : r.config.tag)),
  )
  let lx = left
  for (const [name, color] of legend.filter(([nm]) => present.has(nm))) {
    o.push(
      `<rect class="legend" x="${lx}" y="57" width="10" height="10" fill="${color}"/><text x="${lx + 14}" y="66" font-size="11">${esc(name)}</text>`,
    )
    lx += 24 + name.length * 6.2
  }
  if (withAnchors) {
    o.push(
      `<line x1="${lx}" y1="56" x2="${lx}" y2="68" stroke="#111" stroke-width="2"/><text x="${lx + 6}" y="66" font-size="11">FlashMLA (anchor)</text>`,
    )
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
    o.push(
      `<text x="${x0a - msW - 8}" y="${y + rowH / 2 + 4}" text-anchor="end" font-family="Menlo, Consolas, monospace" font-size="11">${esc(r.config.label)}</text>`,
    )
    const msText = fmt.ms(r.m.ms) + (r.anchorMs !== undefined ? ` (${fmt.ms(r.anchorMs)})` : '')
    o.push(`<text class="ms" x="${x0a - 8}" y="${y + rowH / 2 + 4}" text-anchor="end" font-size="11">${esc(msText)}</text>`)
    const color = tagColor(r.config)
    // FlashMLA's time on the same shape, as a rate: a black marker on the bar's row.
    const a = r.anchorMs
    for (const [x0, v, av, dom, unit, cls, digits] of [
      [x0a, r.m.gbps, a !== undefined ? gbps(r.m.bytes, a) : undefined, domG, 'GB/s', 'gbps', r.m.gbps >= 100 ? 0 : 1],
      [
        x0b,
        r.m.tflops,
        a !== undefined ? tflops(r.m.flops, a) : undefined,
        domT,
        'TFLOPS',
        'tflops',
        r.m.tflops >= 10 ? 1 : r.m.tflops >= 0.1 ? 2 : 3,
      ],
    ] as const) {
      const w = Math.max(0.5, sx(v, dom))
      const tip = `${r.config.label} (b=${r.m.b}): ${v.toFixed(digits)} ${unit}, ${fmt.ms(r.m.ms)} ms`
      o.push(
        `<rect class="bar ${cls}" x="${x0}" y="${num(yb)}" width="${num(w)}" height="${barH}" fill="${color}"><title>${esc(tip)}</title></rect>`,
      )
      const ax = av !== undefined ? sx(av, dom) : 0
      const inside = Math.max(w, ax) > panelW - 44
      const tx = inside ? x0 + Math.min(w, ax > w ? ax - 4 : w) - 4 : x0 + Math.max(w, ax + 1) + 4
      o.push(
        `<text x="${num(tx)}" y="${num(yb + barH - 2)}" font-size="10" ${inside ? 'text-anchor="end" fill="#fff"' : 'fill="#222"'}>${v.toFixed(digits)}</text>`,
      )
      if (av !== undefined) {
        const x = num(x0 + ax)
        o.push(
          `<line class="anchor" x1="${x}" y1="${y + 1}" x2="${x}" y2="${y + rowH - 1}" stroke="#111" stroke-width="2"><title>FlashMLA: ${fmt.ms(r.anchorMs!)} ms, ${av.toFixed(digits)} ${unit}</title></line>`,
        )
      }
    }
  })

  // The copy ceiling: a vertical line across the GB/s panel.
  const cx = num(x0a + sx(ceiling, domG))
  o.push(
    `<line class="ceiling" x1="${cx}" y1="${top - 4}" x2="${cx}" y2="${top + plotH}" stroke="#d62728" stroke-width="1.5" stroke-dasharray="5,3"/>`,
  )
  o.push(
    `<text x="${cx}" y="${top + plotH + 50}" text-anchor="middle" fill="#d62728" font-size="11">copy ceiling ${ceiling.toFixed(0)} GB/s</text>`,
  )
  o.push('</svg>')
  return o.join('\n') + '\n'
}
