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

/**
 * A libcuda.so for CUDA `version` with one device of compute capability `cc`: enough for
 * gpuStatus() and for Device.open up to the context, which it refuses (CUDA_ERROR_UNKNOWN).
 */
function fakeDevice(version: number, cap: [number, number]): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mla-fake-gpu-'))
  fs.writeFileSync(
    path.join(dir, 'fake.c'),
    [
      '#include <string.h>',
      `int cuDriverGetVersion(int *v) { *v = ${version}; return 0; }`,
      'int cuInit(unsigned f) { (void)f; return 0; }',
      'int cuDeviceGetCount(int *n) { *n = 1; return 0; }',
      'int cuDeviceGet(int *d, int ordinal) { *d = ordinal; return ordinal == 0 ? 0 : 101; }',
      // 75 / 76: CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR.
      `int cuDeviceGetAttribute(int *v, int a, int d) { (void)d; *v = a == 75 ? ${cap[0]} : a == 76 ? ${cap[1]} : 0; return 0; }`,
      'int cuDeviceGetName(char *s, int n, int d) { (void)d; strncpy(s, "Fake GPU", n); return 0; }',
      'int cuDevicePrimaryCtxRetain(void **c, int d) { (void)c; (void)d; return 999; }',
      'int cuGetErrorString(int e, const char **s) { (void)e; *s = "unknown error"; return 0; }',
      'int cuGetErrorName(int e, const char **s) { (void)e; *s = "CUDA_ERROR_UNKNOWN"; return 0; }',
      '',
    ].join('\n'),
  )
  const r = spawnSync(cc!, ['-shared', '-fPIC', '-o', path.join(dir, 'libcuda.so'), path.join(dir, 'fake.c')], { encoding: 'utf8' })
  if (r.status !== 0) throw new Error(`${cc}: ${r.stderr}`)
  fs.copyFileSync(path.join(dir, 'libcuda.so'), path.join(dir, 'libcuda.so.1'))
  return dir
}

type Probe = {
  status: {
    available: boolean
    kernelsBuilt: boolean
    devices: { computeCapability: number[]; kernelPath?: string; kernelTarget?: string; reason?: string }[]
  }
  open: { code?: string; message: string }
}
const probeDevice = (version: number, ccv: [number, number], env: Record<string, string> = {}): Probe => {
  const dir = fakeDevice(version, ccv)
  const r = spawnSync(process.execPath, ['-e', PROBE], {
    encoding: 'utf8',
    env: { ...process.env, LD_LIBRARY_PATH: dir, MLA_INDEX: INDEX, ...env },
  })
  if (r.status !== 0) throw new Error(r.stderr)
  return JSON.parse(r.stdout) as Probe
}

/** The kernel path of a (fake) device by compute capability, as gpuStatus() reports it. */
withCc('a stand-in device per compute capability: the kernel path gpuStatus() reports, typed errors below 8.0', (t) => {
  const first = probeDevice(12090, [8, 6])
  if (!first.status.kernelsBuilt) {
    // A CPU-only build: no path for any device, and it says so.
    t.regex(first.status.devices[0]?.reason ?? '', /ERR_KERNELS_UNAVAILABLE/)
    return
  }
  for (const [ccv, kernelPath, kernelTarget] of [
    [[8, 0], 'portable', 'sm_80'],
    [[8, 6], 'portable', 'sm_86'],
    [[8, 9], 'portable', 'sm_89'],
    [[9, 0], 'hopper', 'sm_90a'],
    [[10, 0], 'portable-ptx', 'compute_80'],
    [[12, 0], 'portable', 'sm_120'],
  ] as const) {
    const { status, open } = probeDevice(13000, [ccv[0], ccv[1]])
    t.like(status, { available: true, devices: [{ computeCapability: [...ccv], kernelPath, kernelTarget }] }, `cc ${ccv.join('.')}`)
    // The path is chosen; the stand-in then refuses the context itself.
    t.is(open.code, 'ERR_CUDA', `cc ${ccv.join('.')}: ${open.message}`)
  }
  const old = probeDevice(13000, [7, 5])
  t.false(old.status.available)
  t.is(old.status.devices[0]?.kernelPath, undefined)
  t.regex(old.status.devices[0]?.reason ?? '', /ERR_GPU_UNAVAILABLE.*8\.0 or newer.*got 7\.5/)
  t.is(old.open.code, 'ERR_GPU_UNAVAILABLE')
  t.regex(old.open.message, /8\.0 or newer.*got 7\.5/)
  // Forced portable on Hopper: the compute_80 PTX.
  const forced = probeDevice(13000, [9, 0], { MLA_FORCE_PORTABLE: '1' })
  t.like(forced.status.devices[0], { kernelPath: 'portable-ptx', kernelTarget: 'compute_80' })
  const typo = probeDevice(13000, [9, 0], { MLA_FORCE_PORTABLE: 'yes' })
  t.is(typo.open.code, 'ERR_INVALID_ARGUMENT')
  t.regex(typo.open.message, /MLA_FORCE_PORTABLE: expected 0, 1 or ptx/)
  // The PTX needs a driver as new as the compiler that made it (CUDA 12.9); cubins do not.
  const ptxOld = probeDevice(12080, [10, 0])
  t.false(ptxOld.status.available)
  t.regex(ptxOld.status.devices[0]?.reason ?? '', /ERR_DRIVER_TOO_OLD.*CUDA 12\.9 or newer.*CUDA 12\.8/)
  t.is(ptxOld.open.code, 'ERR_DRIVER_TOO_OLD')
  t.like(probeDevice(12080, [8, 6]).status.devices[0], { kernelPath: 'portable' })
})
