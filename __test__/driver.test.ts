// The driver version check, against a stand-in libcuda.so (a few lines of C, built here
// with the system C compiler) that reports a chosen CUDA version: an old driver must get
// ERR_DRIVER_TOO_OLD with both versions named, and gpuStatus() must report the version.
// Each case runs in a child process, since the driver is probed once per process.
import { spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import test, { type ExecutionContext } from 'ava'

const INDEX = path.join(__dirname, '..', 'index.js')
const cc = ['cc', 'gcc', 'clang'].find((c) => spawnSync(c, ['--version']).status === 0)

/** A libcuda.so whose cuDriverGetVersion says `version` and whose cuInit fails (no device). */
function fakeDriver(version: number): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mla-fake-cuda-'))
  fs.writeFileSync(
    path.join(dir, 'fake.c'),
    [
      `int cuDriverGetVersion(int *v) { *v = ${version}; return 0; }`,
      'int cuInit(unsigned f) { (void)f; return 100; } /* CUDA_ERROR_NO_DEVICE */',
      // What an error message is made of (cudarc formats a failed call with these).
      'int cuGetErrorString(int e, const char **s) { (void)e; *s = "no CUDA-capable device is detected"; return 0; }',
      'int cuGetErrorName(int e, const char **s) { (void)e; *s = "CUDA_ERROR_NO_DEVICE"; return 0; }',
      '',
    ].join('\n'),
  )
  const r = spawnSync(cc!, ['-shared', '-fPIC', '-o', path.join(dir, 'libcuda.so'), path.join(dir, 'fake.c')], { encoding: 'utf8' })
  if (r.status !== 0) throw new Error(`${cc}: ${r.stderr}`)
  fs.copyFileSync(path.join(dir, 'libcuda.so'), path.join(dir, 'libcuda.so.1'))
  return dir
}

function withDriver(dir: string, script: string): { status: unknown; open: { code?: string; message: string } } {
  const r = spawnSync(process.execPath, ['-e', script], {
    encoding: 'utf8',
    env: { ...process.env, LD_LIBRARY_PATH: dir, MLA_INDEX: INDEX },
  })
  if (r.status !== 0) throw new Error(r.stderr)
  return JSON.parse(r.stdout)
}

const PROBE = `
  const m = require(process.env.MLA_INDEX)
  let open = { message: 'opened' }
  try { m.Device.open('cuda') } catch (e) { open = { code: e.code, message: e.message } }
  console.log(JSON.stringify({ status: m.gpuStatus(), open }))
`

/** A test that needs the C compiler; without one it is listed as skipped, saying why. */
const withCc = (title: string, f: (t: ExecutionContext) => void) =>
  cc === undefined ? test.skip(`no C compiler (cc, gcc, clang) | ${title}`, () => undefined) : test(title, f)

withCc('a driver for CUDA 11.8: ERR_DRIVER_TOO_OLD, naming its version and the one needed', (t) => {
  const { status, open } = withDriver(fakeDriver(11080), PROBE)
  t.like(status, { available: false, deviceCount: 0, driverVersion: [11, 8] })
  t.is(open.code, 'ERR_DRIVER_TOO_OLD')
  t.regex(open.message, /CUDA 12\.0 or newer/)
  t.regex(open.message, /CUDA 11\.8/)
  t.regex((status as { reason: string }).reason, /CUDA 11\.8/)
})

withCc('a driver for CUDA 12.8 is new enough: its version is reported, the failure is its own', (t) => {
  const { status, open } = withDriver(fakeDriver(12080), PROBE)
  t.like(status, { available: false, driverVersion: [12, 8] })
  t.regex((status as { reason: string }).reason, /cuInit failed/)
  t.is(open.code, 'ERR_GPU_UNAVAILABLE')
})
