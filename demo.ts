// Demo: open the best device, fill a paged latent cache with random rows for a batch of
// sequences of different lengths, plan and decode (bf16; h_q 16 and 128; s_q 1 and 2),
// and print time, bandwidth and throughput with the contract's formulas.
//
//   npm run demo                       # auto device, sizes picked for it
//   npm run demo -- --device cpu --batch 4 --seqlen 512 --iters 5
//   npm run demo -- --help
//
// Compiled to dist/demo.js by `npm run build`.

import { parseArgs } from 'node:util'
import { Device, KvCache, MlaError, decodeBytes, decodeFlops, decodeSync, gpuStatus, type DeviceSpec } from './index'

const HELP = `mla-decode demo: decode a random batch on the best device and print ms, GB/s, TFLOPS

Usage:
  npm run demo -- [options]          (or: node dist/demo.js [options])

Options:
  --device auto|cpu|cuda[:n]   device (default auto: CUDA device 0 if usable, else CPU)
  --batch N                    sequences (default 64 on CUDA, 8 on the CPU backend)
  --seqlen N                   mean cache length in tokens; lengths are drawn from
                               Normal(N, N/2), clamped to [2, 2N] (default 4096 on CUDA,
                               1024 on the CPU backend)
  --iters N                    timed runs per configuration, median reported (default 30
                               on CUDA, 5 on the CPU backend)
  --seed N                     seed of the random lengths and values (default 42)
  -h, --help                   this text

Exit status: 0 done, 1 a failure (printed as one line with its error code), 2 a usage error.`

class UsageError extends Error {}

interface Options {
  device: DeviceSpec
  batch?: number
  seqlen?: number
  iters?: number
  seed: number
}

/** The command line, checked as the mla-decode CLI checks its own (same messages). */
function parseOptions(argv: string[]): Options | 'help' {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      device: { type: 'string', default: 'auto' },
      batch: { type: 'string' },
      seqlen: { type: 'string' },
      iters: { type: 'string' },
      seed: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  })
  if (values.help) return 'help'
  if (!/^(auto|cpu|cuda(:\d+)?)$/.test(values.device))
    throw new UsageError(`--device: expected auto, cpu, cuda or cuda:<n>, got '${values.device}'`)
  const int = (name: string, s: string | undefined, min: number): number | undefined => {
    if (s === undefined) return undefined
    const n = Number(s)
    if (s.trim() === '' || !Number.isSafeInteger(n) || n < min) {
      throw new UsageError(`--${name}: expected ${min === 1 ? 'a positive integer' : `an integer >= ${min}`}, got '${s}'`)
    }
    return n
  }
  return {
    device: values.device as DeviceSpec,
    batch: int('batch', values.batch, 1),
    seqlen: int('seqlen', values.seqlen, 1),
    iters: int('iters', values.iters, 1),
    seed: int('seed', values.seed, 0) ?? 42,
  }
}

/** A small seeded normal generator (Box-Muller over mulberry32). */
function rng(seed: number) {
  let s = seed >>> 0
  const u = () => {
    let t = (s = (s + 0x6d2b79f5) >>> 0)
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return (((t ^ (t >>> 14)) >>> 0) + 1) / 4294967297
  }
  return () => Math.sqrt(-2 * Math.log(u())) * Math.cos(2 * Math.PI * u())
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

function main(argv: string[]): number {
  const opts = parseOptions(argv)
  if (opts === 'help') {
    console.log(HELP)
    return 0
  }
  const status = gpuStatus()
  using dev = Device.open(opts.device)
  const info = dev.info
  const onGpu = dev.kind === 'cuda'
  const batch = opts.batch ?? (onGpu ? 64 : 8)
  const meanLen = opts.seqlen ?? (onGpu ? 4096 : 1024)
  const iters = opts.iters ?? (onGpu ? 30 : 5)
  const maxSq = 2
  const normal = rng(opts.seed)

  console.log(`mla-decode demo: ${dev.kind} backend, ${info.name}`)
  if (!onGpu) console.log(`  (GPU: ${status.available ? 'available but not selected' : `not used: ${status.reason}`})`)

  // Variable lengths: Normal(mean, mean/2), clamped to [s_q, 2 * mean].
  const lens = Array.from({ length: batch }, () => Math.round(Math.min(2 * meanLen, Math.max(maxSq, meanLen + (meanLen / 2) * normal()))))
  const total = lens.reduce((a, b) => a + b, 0)
  const numBlocks = lens.reduce((a, l) => a + Math.ceil(l / 64), 0)

  // One random chunk of latent rows (N(0,1)/10 clamped), appended piecewise.
  const chunkRows = 1024
  const chunk = new Float32Array(chunkRows * 576)
  for (let i = 0; i < chunk.length; i++) chunk[i] = Math.max(-1, Math.min(1, normal() / 10))

  const t0 = process.hrtime.bigint()
  using cache = new KvCache(dev, { numBlocks, dtype: 'bf16' })
  const seqs = lens.map((len) => {
    const s = cache.createSequence()
    for (let done = 0; done < len;) {
      const n = Math.min(chunkRows, len - done)
      cache.append(s, chunk.subarray(0, n * 576))
      done += n
    }
    return s
  })
  const { blockTable, cacheSeqlens } = cache.batch(seqs)
  const fillMs = Number(process.hrtime.bigint() - t0) / 1e6
  console.log(
    `  cache: ${batch} sequences, ${total} tokens (mean ${Math.round(total / batch)}), ${numBlocks} blocks, filled in ${fillMs.toFixed(0)} ms\n`,
  )

  const rows: string[][] = [['backend', 'device', 'config', 'ms', 'GB/s', 'TFLOPS']]
  for (const hQ of [16, 128]) {
    for (const sQ of [1, 2]) {
      const q = dev.tensor(
        Float32Array.from({ length: batch * sQ * hQ * 576 }, () => Math.max(-1, Math.min(1, normal() / 10))),
        [batch, sQ, hQ, 576],
        'bf16',
      )
      // The plan depends only on the lengths and sQ * hQ: computed once, reused per layer.
      using plan = dev.plan(cacheSeqlens, { sQ, hQ })
      const run = () => decodeSync({ q, kvCache: cache, blockTable, cacheSeqlens, plan, causal: true })
      run() // warm-up
      const times: number[] = []
      for (let i = 0; i < iters; i++) {
        const s = process.hrtime.bigint()
        const r = run() // returns once the device is synchronised
        times.push(Number(process.hrtime.bigint() - s) / 1e9)
        r.out.dispose()
        r.lse.dispose()
      }
      const sec = median(times)
      rows.push([
        dev.kind,
        info.name,
        `b=${batch} s_q=${sQ} h_q=${hQ} causal bf16`,
        (sec * 1e3).toFixed(3),
        (decodeBytes(lens, sQ, hQ) / sec / 1e9).toFixed(1),
        (decodeFlops(lens, sQ, hQ) / sec / 1e12).toFixed(3),
      ])
      q.dispose()
    }
  }
  const width = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)))
  for (const [i, r] of rows.entries()) {
    console.log(r.map((cell, c) => (c >= 3 ? cell.padStart(width[c]!) : cell.padEnd(width[c]!))).join('  '))
    if (i === 0) console.log(width.map((w) => '-'.repeat(w)).join('  '))
  }
  console.log(`\n(median of ${iters} runs, host-timed around decode + synchronize; GB/s and TFLOPS per the contract's formulas)`)
  return 0
}

try {
  process.exitCode = main(process.argv.slice(2))
} catch (e) {
  // One line per failure, with the error code: what a script or a person acts on.
  const usage = e instanceof UsageError || (e instanceof Error && (e as { code?: string }).code?.startsWith('ERR_PARSE_ARGS'))
  if (e instanceof MlaError) console.error(`mla-decode demo: ${e.code}: ${e.message}`)
  else console.error(`mla-decode demo: ${e instanceof Error ? e.message : String(e)}`)
  if (usage) console.error("run 'npm run demo -- --help' for the options")
  process.exitCode = usage ? 2 : 1
}
