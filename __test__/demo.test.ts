// The demo's command line (dist/demo.js): help, usage errors, typed errors, a small run.
import { spawnSync } from 'node:child_process'
import * as path from 'node:path'
import test from 'ava'
import { gpuStatus } from '../index'

const DEMO = path.join(__dirname, '..', 'demo.js')

function demo(args: string[]) {
  const r = spawnSync(process.execPath, [DEMO, ...args], { encoding: 'utf8', timeout: 120_000 })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

test('demo --help lists every option', (t) => {
  const r = demo(['--help'])
  t.is(r.code, 0)
  for (const o of ['--device', '--batch', '--seqlen', '--iters', '--seed', '--help']) t.true(r.stdout.includes(o), o)
})

test('demo: unknown flags and bad numbers are usage errors (exit 2, one message, a pointer to --help)', (t) => {
  for (const [args, msg] of [
    [['--bogus'], /Unknown option '--bogus'/],
    [['--batch', '0'], /--batch: expected a positive integer, got '0'/],
    [['--iters', '1.5'], /--iters: expected a positive integer, got '1.5'/],
    [['--seqlen', 'x'], /--seqlen: expected a positive integer, got 'x'/],
    [['--seed=-1'], /--seed: expected an integer >= 0, got '-1'/],
    [['--device', 'gpu'], /--device: expected auto, cpu, cuda or cuda:<n>, got 'gpu'/],
  ] as const) {
    const r = demo([...args])
    t.is(r.code, 2, args.join(' '))
    t.regex(r.stderr, msg)
    t.regex(r.stderr, /run 'npm run demo -- --help'/)
    t.is(r.stdout, '')
  }
})

test('demo: a typed error is one line with its code (exit 1)', (t) => {
  const s = gpuStatus()
  if (s.available) return t.pass('a GPU is usable here: --device cuda succeeds')
  const r = demo(['--device', 'cuda'])
  t.is(r.code, 1)
  const lines = r.stderr.trim().split('\n')
  t.is(lines.length, 1, r.stderr)
  t.regex(lines[0]!, /^mla-decode demo: ERR_(GPU_UNAVAILABLE|KERNELS_UNAVAILABLE|DRIVER_TOO_OLD): /)
})

test('demo runs a small CPU decode', (t) => {
  const r = demo(['--device', 'cpu', '--batch', '2', '--seqlen', '64', '--iters', '1'])
  t.is(r.code, 0, r.stderr)
  t.regex(r.stdout, /cpu\s+CPU backend .* b=2 s_q=1 h_q=16 causal bf16/)
  t.is(r.stdout.match(/b=2 s_q=\d h_q=\d+ causal bf16/g)?.length, 4)
})
